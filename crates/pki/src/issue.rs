//! `pki ca init`, `pki csr`, `pki sign`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::{read, write, write_new, PkiError};

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Rcgen {
        what: what.to_string(),
        source,
    }
}

/// Where a CA keeps its files.
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        }
    }
}

/// Makes a self-signed CA valid for ten years in `dir` (ca.crt, ca.key). Refuses to
/// overwrite an existing CA: every certificate it signed would stop being trusted.
pub fn ca_init(dir: &Path, common_name: &str) -> Result<CaFiles, PkiError> {
    let files = CaFiles::in_dir(dir);
    if files.key.exists() {
        return Err(PkiError::Usage(format!(
            "a CA already exists in {} (ca.key): remove it first if you really want a new one, \
             then re-issue every peer certificate",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let key = KeyPair::generate().map_err(rcgen_err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Causeway lab CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    params.serial_number = Some(random_serial()?);
    let cert = params
        .self_signed(&key)
        .map_err(rcgen_err("self-signing the CA"))?;
    write(&files.key, &key.serialize_pem(), true)?;
    write(&files.cert, &cert.pem(), false)?;
    Ok(files)
}

/// The subject of a CSR, from the seed's arguments: `CN:<cn>`, `OU:`, `O:`, `L:`, `ST:`, `C:`,
/// `subjectAltName:<name>,<ip>,…` (each entry an IP address or a DNS name).
#[derive(Debug, Default, PartialEq)]
pub struct CsrSubject {
    pub common_name: Option<String>,
    pub fields: Vec<(String, String)>,
    pub alt_names: Vec<String>,
}

/// Parses `CN:x OU:y subjectAltName:a,b`. The seed also writes `CN: postgres` with a space,
/// so a key followed by an empty value takes the next argument.
pub fn parse_subject_args(args: &[String]) -> Result<CsrSubject, PkiError> {
    let mut subject = CsrSubject::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some((key, value)) = arg.split_once(':') else {
            return Err(PkiError::Usage(format!(
                "'{arg}' is not KEY:VALUE; use CN:<name>, OU:, O:, L:, ST:, C: or subjectAltName:<a,b>"
            )));
        };
        let value = if value.is_empty() {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| PkiError::Usage(format!("{key}: has no value")))?
        } else {
            value.to_string()
        };
        match key {
            "CN" => subject.common_name = Some(value),
            "OU" | "O" | "L" | "ST" | "C" => subject.fields.push((key.to_string(), value)),
            "subjectAltName" | "SAN" => subject.alt_names.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            ),
            other => {
                return Err(PkiError::Usage(format!(
                    "unknown subject field '{other}': use CN, OU, O, L, ST, C or subjectAltName"
                )))
            }
        }
        i += 1;
    }
    if subject.common_name.is_none() {
        return Err(PkiError::Usage("a CSR needs CN:<common name>".into()));
    }
    Ok(subject)
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name.to_string().try_into().map_err(|_| {
        PkiError::Usage(format!(
            "subjectAltName '{name}' is neither an IP address nor a DNS name"
        ))
    })?;
    Ok(SanType::DnsName(dns))
}

/// What [`csr_with`] does when `<dir>/<name>.key` already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingKey {
    /// Refuse, naming the file: a certificate issued for that key would stop matching it.
    Refuse,
    /// Replace it with the new key (`pki csr --force`).
    Replace,
}

/// Makes `<dir>/<name>.key` and `<dir>/<name>.csr`, replacing a key already there: for
/// callers that make a fresh identity in a directory of their own (the lab, tests). An
/// operator's `pki csr` uses [`csr_with`] and [`ExistingKey::Refuse`].
pub fn csr(dir: &Path, name: &str, subject: &CsrSubject) -> Result<(PathBuf, PathBuf), PkiError> {
    csr_with(dir, name, subject, ExistingKey::Replace)
}

/// Makes `<dir>/<name>.key` and `<dir>/<name>.csr`. The CN is also added as a SAN when it
/// looks like an address, because TLS libraries match SANs only. With
/// [`ExistingKey::Refuse`], an existing key file is left as it was and nothing is written.
pub fn csr_with(
    dir: &Path,
    name: &str,
    subject: &CsrSubject,
    existing: ExistingKey,
) -> Result<(PathBuf, PathBuf), PkiError> {
    if name.is_empty() || name.contains('/') {
        return Err(PkiError::Usage(format!("'{name}' is not a file base name")));
    }
    let key_path = dir.join(format!("{name}.key"));
    let csr_path = dir.join(format!("{name}.csr"));
    let refuse = || {
        PkiError::Usage(format!(
            "{} already exists: nothing was written. Pass --force to replace it with a new key \
             (the certificate issued for the old key stops matching it: the peer needs a new \
             certificate signed from the new CSR before it can cluster again)",
            key_path.display()
        ))
    };
    if existing == ExistingKey::Refuse && key_path.exists() {
        return Err(refuse());
    }
    let key = KeyPair::generate().map_err(rcgen_err("generating the key"))?;
    let mut params = CertificateParams::default();
    let cn = subject.common_name.clone().unwrap_or_default();
    params
        .distinguished_name
        .push(DnType::CommonName, cn.as_str());
    for (k, v) in &subject.fields {
        let ty = match k.as_str() {
            "OU" => DnType::OrganizationalUnitName,
            "O" => DnType::OrganizationName,
            "L" => DnType::LocalityName,
            "ST" => DnType::StateOrProvinceName,
            _ => DnType::CountryName,
        };
        params.distinguished_name.push(ty, v.as_str());
    }
    let mut names = subject.alt_names.clone();
    if !names.contains(&cn) && (cn.parse::<IpAddr>().is_ok() || cn.contains('.')) {
        names.insert(0, cn.clone());
    }
    params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
    let request = params
        .serialize_request(&key)
        .map_err(rcgen_err("making the CSR"))?;
    match existing {
        ExistingKey::Replace => write(&key_path, &key.serialize_pem(), true)?,
        // Created only if still absent: a key that appeared since the check is kept too.
        ExistingKey::Refuse => match write_new(&key_path, &key.serialize_pem(), true) {
            Err(PkiError::Write { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                return Err(refuse())
            }
            other => other?,
        },
    }
    write(
        &csr_path,
        &request.pem().map_err(rcgen_err("encoding the CSR"))?,
        false,
    )?;
    Ok((key_path, csr_path))
}

/// Signs a CSR with the CA, for `days`, as a certificate usable for both ends of a cluster
/// link (serverAuth and clientAuth). The CSR's subject and SANs are kept.
pub fn sign_csr(csr_path: &Path, ca: &CaFiles, days: u32, out: &Path) -> Result<(), PkiError> {
    let csr_pem = String::from_utf8_lossy(&read(csr_path)?).into_owned();
    let mut request =
        CertificateSigningRequestParams::from_pem(&csr_pem).map_err(|e| PkiError::Invalid {
            path: csr_path.display().to_string(),
            what: format!("not a valid CSR ({e})"),
        })?;
    let ca_key_pem = String::from_utf8_lossy(&read(&ca.key)?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Invalid {
        path: ca.key.display().to_string(),
        what: format!("not a usable CA key ({e})"),
    })?;
    let ca_cert_pem = String::from_utf8_lossy(&read(&ca.cert)?).into_owned();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(|e| PkiError::Invalid {
        path: ca.cert.display().to_string(),
        what: format!("not a usable CA certificate ({e})"),
    })?;
    let p = &mut request.params;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(i64::from(days));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.serial_number = Some(random_serial()?);
    p.use_authority_key_identifier_extension = true;
    let cert = request
        .signed_by(&issuer)
        .map_err(rcgen_err("signing the CSR"))?;
    write(out, &cert.pem(), false)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Usage("the system random generator failed".into()))?;
    bytes[0] &= 0x7f; // a positive serial
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn parses_the_seed_syntax() {
        let s = parse_subject_args(&args("CN: postgres")).unwrap();
        assert_eq!(s.common_name.as_deref(), Some("postgres"));
        let s = parse_subject_args(&args(
            "CN:peer1.lab OU:ops subjectAltName:peer1.lab,127.0.0.1",
        ))
        .unwrap();
        assert_eq!(s.fields, vec![("OU".to_string(), "ops".to_string())]);
        assert_eq!(s.alt_names, vec!["peer1.lab", "127.0.0.1"]);
        assert!(parse_subject_args(&args("OU:x"))
            .unwrap_err()
            .to_string()
            .contains("CN"));
        assert!(parse_subject_args(&args("XX:y CN:a"))
            .unwrap_err()
            .to_string()
            .contains("XX"));
    }

    #[test]
    fn a_csr_refuses_to_replace_an_existing_key_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let subject = parse_subject_args(&args("CN:peer1.lab")).unwrap();
        let (key, csr_path) = csr_with(dir.path(), "peer1", &subject, ExistingKey::Refuse).unwrap();
        let first_key = std::fs::read(&key).unwrap();
        let first_csr = std::fs::read(&csr_path).unwrap();
        // Again without --force: refused, naming the file and what --force would do; the key
        // and the CSR stay as they were.
        let err = csr_with(dir.path(), "peer1", &subject, ExistingKey::Refuse)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&key.display().to_string()), "{err}");
        assert!(err.contains("--force"), "{err}");
        assert!(err.contains("stops matching"), "{err}");
        assert_eq!(std::fs::read(&key).unwrap(), first_key);
        assert_eq!(std::fs::read(&csr_path).unwrap(), first_csr);
        // With --force: a new key, and a CSR for it; the key file is private again even if
        // the old one had been opened up.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (key2, _) = csr_with(dir.path(), "peer1", &subject, ExistingKey::Replace).unwrap();
        assert_eq!(key2, key);
        assert_ne!(std::fs::read(&key).unwrap(), first_key);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another name in the same directory is not affected.
        csr_with(dir.path(), "peer2", &subject, ExistingKey::Refuse).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path(), "lab").unwrap();
        let err = ca_init(dir.path(), "lab").err().unwrap();
        assert!(err.to_string().contains("already exists"));
    }
}
