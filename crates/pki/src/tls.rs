//! rustls configurations for cluster links.
//!
//! Permissive: certificates are not checked against the CA or the peer list, but rustls still
//! checks the handshake signatures, so the link is encrypted and bound to the presented key.
//! Enforce: both ends must present a certificate that chains to the trusted CA; the name check
//! against the peer list happens after the handshake (see `check_certificate`), where the
//! mesh knows which peer is calling and can tell it why it is refused.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use serde::{Deserialize, Serialize};

/// The cluster's TLS verification mode (EX-6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TlsMode {
    #[default]
    Permissive,
    Enforce,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Permissive => "Permissive",
            TlsMode::Enforce => "Enforce",
        })
    }
}

/// Installs ring as the process's crypto provider. Call first thing in `main` and in tests:
/// two providers in one dependency graph make rustls panic when it has to pick one.
pub fn install_crypto_provider() {
    // Err means a provider is installed already (a second call in tests): nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// This node's certificate chain and key, and the CA it trusts for its peers.
#[derive(Clone)]
pub struct NodeIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub roots: Arc<RootCertStore>,
}

impl NodeIdentity {
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Self, crate::PkiError> {
        let chain = crate::load_certs(cert)?;
        let key = crate::load_key(key)?;
        let mut roots = RootCertStore::empty();
        for c in crate::load_certs(ca)? {
            roots.add(c).map_err(|e| crate::PkiError::Invalid {
                path: ca.display().to_string(),
                what: format!("not a usable CA certificate ({e})"),
            })?;
        }
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
        })
    }
}

pub fn server_config(mode: TlsMode, id: &NodeIdentity) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let verifier: Arc<dyn ClientCertVerifier> = match mode {
        TlsMode::Enforce => {
            WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("building the client verifier: {e}")))?
        }
        TlsMode::Permissive => Arc::new(SignatureOnly::new(&provider, None)),
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    Ok(Arc::new(config))
}

pub fn client_config(mode: TlsMode, id: &NodeIdentity) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = provider();
    let roots = match mode {
        TlsMode::Enforce => Some(id.roots.clone()),
        TlsMode::Permissive => None,
    };
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SignatureOnly::new(&provider, roots)))
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    Ok(Arc::new(config))
}

/// Verifies handshake signatures always, and the chain to `roots` when given. Names are
/// checked by the mesh after the handshake, against the peer list.
#[derive(Debug)]
struct SignatureOnly {
    algs: WebPkiSupportedAlgorithms,
    roots: Option<Arc<RootCertStore>>,
}

impl SignatureOnly {
    fn new(provider: &CryptoProvider, roots: Option<Arc<RootCertStore>>) -> Self {
        Self {
            algs: provider.signature_verification_algorithms,
            roots,
        }
    }
}

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let parsed = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                self.algs.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SignatureOnly {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Only built with roots = None (Permissive); Enforce uses WebPkiClientVerifier.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// TLS for the HTTPS admin API: this node's certificate, no client certificate asked for
/// (administrators authenticate with a password).
pub fn https_server_config(id: &NodeIdentity) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TLS for SIP (port 5061): this node's certificate, no client certificate asked for
/// (endpoints authenticate with digest); outbound connections check the server's
/// certificate against the CA this node trusts.
pub fn sip_tls_configs(
    id: &NodeIdentity,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), rustls::Error> {
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(id.roots.clone())
        .with_no_client_auth();
    Ok((Arc::new(server), Arc::new(client)))
}
