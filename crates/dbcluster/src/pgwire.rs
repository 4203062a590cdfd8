//! A small PostgreSQL client: the frontend/backend protocol 3.0, simple queries only, over
//! the Unix socket (the agent, peer authentication) or TCP with TLS and a client
//! certificate (health checks, `upgrade_schema`, tests). Every value comes back as text.
//!
//! Why not tokio-postgres: the agent needs a handful of text queries, and this keeps its
//! dependency graph (and the build on 2 cores) small. Sizes are capped: a server cannot
//! make the agent allocate more than [`MAX_MESSAGE`] for one message.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// The largest backend message read (a row of `pg_stat_replication` is far below it).
const MAX_MESSAGE: usize = 16 << 20;
const PROTOCOL_3_0: i32 = 196_608;
const SSL_REQUEST: i32 = 80_877_103;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An error from the server (with its SQLSTATE) or from the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// SQLSTATE when the server sent one (`25006`: read-only transaction).
    pub code: Option<String>,
    pub message: String,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} (SQLSTATE {code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PgError {}

fn io(what: &str, e: std::io::Error) -> PgError {
    PgError {
        code: None,
        message: format!("{what}: {e}"),
    }
}

fn protocol(message: impl Into<String>) -> PgError {
    PgError {
        code: None,
        message: message.into(),
    }
}

/// The rows of a query's last result, each value as text (`None` for NULL).
pub type Rows = Vec<Vec<Option<String>>>;

pub struct PgConn {
    stream: BufReader<Box<dyn Stream>>,
}

/// Whom to connect to and as what.
pub struct Login<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub application_name: &'a str,
}

impl Default for Login<'_> {
    fn default() -> Self {
        Self {
            user: "postgres",
            database: "postgres",
            application_name: "causeway",
        }
    }
}

impl PgConn {
    /// Over the Unix socket file `socket` (`…/.s.PGSQL.5432`).
    pub async fn unix(
        socket: &Path,
        login: &Login<'_>,
        timeout: Duration,
    ) -> Result<Self, PgError> {
        let fut = async {
            let s = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| io(&format!("connecting to {}", socket.display()), e))?;
            Self::startup(Box::new(s), login).await
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| protocol(format!("connecting to {}: timed out", socket.display())))?
    }

    /// Over TCP to `addr` with TLS (`sslmode=verify-ca`: `tls` checks the chain, not the
    /// name), presenting the client certificate `tls` holds.
    pub async fn tls(
        addr: std::net::SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        login: &Login<'_>,
        timeout: Duration,
    ) -> Result<Self, PgError> {
        let fut = async {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| io(&format!("could not connect to server {addr}"), e))?;
            let _ = s.set_nodelay(true);
            let mut req = Vec::with_capacity(8);
            req.extend_from_slice(&8i32.to_be_bytes());
            req.extend_from_slice(&SSL_REQUEST.to_be_bytes());
            s.write_all(&req)
                .await
                .map_err(|e| io("sending SSLRequest", e))?;
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer)
                .await
                .map_err(|e| io("reading the answer to SSLRequest", e))?;
            if answer[0] != b'S' {
                return Err(protocol(format!("server {addr} does not support SSL")));
            }
            let name = ServerName::IpAddress(addr.ip().into());
            let tls_stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, s)
                .await
                .map_err(|e| io(&format!("TLS with {addr}"), e))?;
            Self::startup(Box::new(tls_stream), login).await
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| protocol(format!("connecting to {addr}: timed out")))?
    }

    async fn startup(stream: Box<dyn Stream>, login: &Login<'_>) -> Result<Self, PgError> {
        let mut conn = PgConn {
            stream: BufReader::with_capacity(16 << 10, stream),
        };
        let mut body = Vec::with_capacity(96);
        body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for (k, v) in [
            ("user", login.user),
            ("database", login.database),
            ("application_name", login.application_name),
        ] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        conn.send(&msg).await?;
        loop {
            let (tag, body) = conn.read_message().await?;
            match tag {
                b'R' => {
                    let code = be_i32(&body, 0)?;
                    if code != 0 {
                        return Err(protocol(format!(
                            "the server asks for password authentication (method {code}); Causeway authenticates by certificate or peer"
                        )));
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(conn),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), PgError> {
        let s = self.stream.get_mut();
        s.write_all(bytes).await.map_err(|e| io("sending", e))?;
        s.flush().await.map_err(|e| io("sending", e))
    }

    async fn read_message(&mut self) -> Result<(u8, Vec<u8>), PgError> {
        let mut head = [0u8; 5];
        self.stream
            .read_exact(&mut head)
            .await
            .map_err(|e| io("server closed the connection unexpectedly", e))?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|l| (4..=MAX_MESSAGE).contains(l))
            .ok_or_else(|| protocol(format!("backend message of length {len} refused")))?;
        let mut body = vec![0u8; len - 4];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| io("reading a backend message", e))?;
        Ok((head[0], body))
    }

    /// Runs `sql` (one or more statements) and returns the rows of its last result that
    /// had rows. An error ends it; the connection stays usable.
    pub async fn query(&mut self, sql: &str) -> Result<Rows, PgError> {
        let mut msg = Vec::with_capacity(sql.len() + 6);
        msg.push(b'Q');
        msg.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.send(&msg).await?;
        let mut rows: Rows = Vec::new();
        let mut current: Rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'T' => current = Vec::new(),
                b'D' => current.push(data_row(&body)?),
                b'C' if !current.is_empty() => rows = std::mem::take(&mut current),
                b'E' => error = Some(server_error(&body)),
                b'Z' => break,
                _ => {} // EmptyQueryResponse, notices, ParameterStatus
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// The first value of the first row, if any.
    pub async fn value(&mut self, sql: &str) -> Result<Option<String>, PgError> {
        Ok(self
            .query(sql)
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// Says goodbye (the server logs no "unexpected EOF").
    pub async fn close(mut self) {
        let _ = self.send(&[b'X', 0, 0, 0, 4]).await;
    }
}

fn be_i32(b: &[u8], at: usize) -> Result<i32, PgError> {
    b.get(at..at + 4)
        .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| protocol("backend message too short"))
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, PgError> {
    let n = body
        .get(..2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
        .ok_or_else(|| protocol("DataRow too short"))?;
    let mut at = 2;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = be_i32(body, at)?;
        at += 4;
        if len < 0 {
            row.push(None);
            continue;
        }
        let end = at + len as usize;
        let v = body
            .get(at..end)
            .ok_or_else(|| protocol("DataRow value past its end"))?;
        row.push(Some(String::from_utf8_lossy(v).into_owned()));
        at = end;
    }
    Ok(row)
}

fn server_error(body: &[u8]) -> PgError {
    let (mut code, mut message) = (None, String::new());
    for field in body.split(|b| *b == 0) {
        let Some((&kind, text)) = field.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(text).into_owned();
        match kind {
            b'C' => code = Some(text),
            b'M' => message = text,
            _ => {}
        }
    }
    PgError { code, message }
}

/// Quotes `s` as an SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_row_with_a_null_and_a_value() {
        let mut body = 2u16.to_be_bytes().to_vec();
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ok");
        assert_eq!(data_row(&body).unwrap(), vec![None, Some("ok".into())]);
    }

    #[test]
    fn a_data_row_that_lies_about_its_length_is_refused() {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend_from_slice(&100i32.to_be_bytes());
        body.extend_from_slice(b"short");
        assert!(data_row(&body).is_err());
        assert!(data_row(&[0]).is_err());
    }

    #[test]
    fn server_errors_keep_their_sqlstate() {
        let e =
            server_error(b"SERROR\0C25006\0Mcannot execute INSERT in a read-only transaction\0\0");
        assert_eq!(e.code.as_deref(), Some("25006"));
        assert!(e.message.contains("read-only"));
    }

    #[test]
    fn literals_double_their_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
    }
}
