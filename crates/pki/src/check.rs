//! Is a peer's certificate valid for its address in the peer list? (EX-4, EX-6)

use std::fmt;
use std::net::IpAddr;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{AlertDescription, CertificateError, RootCertStore};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Certificate status as the Clustering page shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", content = "reason")]
pub enum CertStatus {
    Valid,
    Invalid(String),
    /// Not seen yet: no connection has reached the TLS handshake.
    #[default]
    Unknown,
}

impl CertStatus {
    pub fn is_valid(&self) -> bool {
        matches!(self, CertStatus::Valid)
    }
}

impl fmt::Display for CertStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertStatus::Valid => f.write_str("Valid"),
            CertStatus::Invalid(reason) => write!(f, "Invalid ({reason})"),
            CertStatus::Unknown => f.write_str("Unknown"),
        }
    }
}

/// Checks `chain` (leaf first) for the peer whose address in the peer list is `address`:
/// in its validity period, chaining to `roots`, and with a CN or SAN equal to `address`
/// (a DNS name compared case-insensitively, an IP address compared as an address).
pub fn check_certificate(
    chain: &[CertificateDer<'_>],
    address: &str,
    roots: &RootCertStore,
) -> CertStatus {
    let Some(leaf) = chain.first() else {
        return CertStatus::Invalid("no certificate presented".into());
    };
    let Ok((_, cert)) = X509Certificate::from_der(leaf.as_ref()) else {
        return CertStatus::Invalid("certificate could not be parsed".into());
    };
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return CertStatus::Invalid(format!("certificate expired on {}", validity.not_after));
    }
    if now < validity.not_before {
        return CertStatus::Invalid(format!(
            "certificate is not valid before {}",
            validity.not_before
        ));
    }
    match ParsedCertificate::try_from(leaf) {
        Ok(parsed) => {
            let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
            if let Err(e) = rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                &chain[1..],
                UnixTime::now(),
                algs.all,
            ) {
                return CertStatus::Invalid(describe_tls_error(&e));
            }
        }
        Err(e) => return CertStatus::Invalid(describe_tls_error(&e)),
    }
    let names = certificate_names(&cert);
    if names.iter().any(|n| name_matches(n, address)) {
        CertStatus::Valid
    } else {
        // The seed's words first, then what differs.
        CertStatus::Invalid(format!(
            "Common Name in certificate does not match: peer address is '{address}', certificate names {}",
            names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
        ))
    }
}

/// The CN values and the DNS and IP SANs of a certificate.
fn certificate_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(String::from))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => names.push(
                        IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default()).to_string(),
                    ),
                    16 => names.push(
                        IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default()).to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    // A name in both the CN and a SAN (the usual way) is shown once.
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn name_matches(name: &str, address: &str) -> bool {
    match (name.parse::<IpAddr>(), address.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        (Err(_), Err(_)) => name
            .trim_end_matches('.')
            .eq_ignore_ascii_case(address.trim_end_matches('.')),
        _ => false,
    }
}

/// Operator words for a TLS failure.
pub fn describe_tls_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "certificate is not signed by a trusted CA".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate is not valid yet".into()
            }
            CertificateError::BadSignature => "certificate signature is invalid".into(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "certificate is not for TLS server and client use (extended key usage)".into()
            }
            other => format!("certificate rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired => {
                format!("the peer refused this system's certificate ({alert:?}): check that both peers trust the same CA")
            }
            other => format!("the peer ended the TLS handshake ({other:?})"),
        },
        rustls::Error::NoCertificatesPresented => "no certificate presented".into(),
        other => format!("TLS error: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ca_init, csr, parse_subject_args, sign_csr, CaFiles};

    fn issue(
        dir: &std::path::Path,
        ca: &CaFiles,
        name: &str,
        subject: &str,
    ) -> Vec<CertificateDer<'static>> {
        let args: Vec<String> = subject.split(' ').map(String::from).collect();
        let (_, csr_path) = csr(dir, name, &parse_subject_args(&args).unwrap()).unwrap();
        let out = dir.join(format!("{name}.crt"));
        sign_csr(&csr_path, ca, 30, &out).unwrap();
        crate::load_certs(&out).unwrap()
    }

    fn roots(ca: &CaFiles) -> RootCertStore {
        let mut r = RootCertStore::empty();
        for c in crate::load_certs(&ca.cert).unwrap() {
            r.add(c).unwrap();
        }
        r
    }

    #[test]
    fn valid_for_its_own_address_only() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_init(&dir.path().join("ca"), "lab").unwrap();
        let roots = roots(&ca);
        let ip = issue(dir.path(), &ca, "p1", "CN:127.0.0.1");
        assert_eq!(
            check_certificate(&ip, "127.0.0.1", &roots),
            CertStatus::Valid
        );
        let st = check_certificate(&ip, "127.0.0.2", &roots);
        assert!(
            st.to_string()
                .starts_with("Invalid (Common Name in certificate does not match"),
            "{st}"
        );
        assert!(st.to_string().contains("'127.0.0.2'"));
        assert!(
            st.to_string().ends_with("certificate names '127.0.0.1')"),
            "each name once: {st}"
        );

        // CN only (no SAN) matches too: the seed accepts CN or SAN.
        let fqdn = issue(
            dir.path(),
            &ca,
            "p2",
            "CN:Peer2.Lab.Example subjectAltName:10.1.1.1",
        );
        assert!(check_certificate(&fqdn, "peer2.lab.example", &roots).is_valid());
        assert!(check_certificate(&fqdn, "10.1.1.1", &roots).is_valid());
        assert!(!check_certificate(&fqdn, "peer3.lab.example", &roots).is_valid());
    }

    #[test]
    fn another_ca_is_not_trusted() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_init(&dir.path().join("ca"), "lab").unwrap();
        let other = ca_init(&dir.path().join("other"), "rogue").unwrap();
        let cert = issue(dir.path(), &other, "p1", "CN:127.0.0.1");
        assert_eq!(
            check_certificate(&cert, "127.0.0.1", &roots(&ca)),
            CertStatus::Invalid("certificate is not signed by a trusted CA".into())
        );
    }
}
