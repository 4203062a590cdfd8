//! Certificates for the cluster: a lab CA, CSRs in the seed's syntax, signing, the rustls
//! configurations for Permissive and Enforce, and the check that tells an operator whether a
//! peer's certificate is valid for the address it has in the peer list (EX-4, EX-6, OP-4).
#![forbid(unsafe_code)]

mod check;
mod issue;
mod tls;

pub use check::{check_certificate, describe_tls_error, CertStatus};
pub use issue::{
    ca_init, csr, csr_with, parse_subject_args, sign_csr, CaFiles, CsrSubject, ExistingKey,
};
pub use tls::{
    client_config, https_server_config, install_crypto_provider, server_config, sip_tls_configs,
    NodeIdentity, TlsMode,
};

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| PkiError::Invalid {
        path: path.display().to_string(),
        what: format!("not a PEM certificate file ({e})"),
    })?;
    if certs.is_empty() {
        return Err(PkiError::Invalid {
            path: path.display().to_string(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| PkiError::Invalid {
        path: path.display().to_string(),
        what: format!("not a PEM private key ({e})"),
    })
}

/// Writes `contents` to `path`; private keys get mode 0600.
fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    write_opts(path, contents, private, false)
}

/// As [`write`], but only if `path` does not exist yet (`AlreadyExists` otherwise).
fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    write_opts(path, contents, private, true)
}

fn write_opts(path: &Path, contents: &str, private: bool, new: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    if new {
        opts.write(true).create_new(true);
    } else {
        opts.write(true).create(true).truncate(true);
    }
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    if private {
        // The mode above applies to a new file only: a key written over an existing file
        // (`pki csr --force`) must not keep that file's looser mode.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    f.write_all(contents.as_bytes()).map_err(err)
}
