//! HTTPS for phones: WebGPU (and the microphone permission that unlocks loopback candidates)
//! exist only in a secure context, so a phone opening `http://192.168.x.y:8080` gets neither.
//! `--tls` makes a self-signed certificate at start for this machine's names and addresses;
//! `--tls-cert/--tls-key` use one from elsewhere. The certificate's SHA-256 fingerprint is what
//! native nodes pin (`mdi node --fingerprint`), and its public key's SHA-256 (SPKI, base64) is
//! what Chromium can be told to trust (`--ignore-certificate-errors-spki-list`).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// A certificate ready to serve, with what clients need to trust it.
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the certificate (DER), `AB:CD:...`.
    pub fingerprint: String,
    /// Base64 SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub spki_sha256: String,
}

fn server_config(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Tls> {
    let der = certs
        .first()
        .context("the certificate file holds no certificate")?;
    let fingerprint = Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("the certificate does not parse: {e}"))?;
    let spki = Sha256::digest(parsed.tbs_certificate.subject_pki.raw);
    use base64::Engine as _;
    let spki_sha256 = base64::engine::general_purpose::STANDARD.encode(spki);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a TLS configuration")?;
    Ok(Tls {
        config: Arc::new(config),
        fingerprint,
        spki_sha256,
    })
}

/// A self-signed certificate for `localhost`, loopback, the listening address and this
/// machine's LAN address (valid for a year).
pub fn self_signed(extra_ips: &[IpAddr]) -> Result<Tls> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for ip in extra_ips {
        if !ip.is_unspecified() {
            names.push(ip.to_string());
        }
    }
    names.dedup();
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params = rcgen::CertificateParams::new(names).context("certificate names")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mdi signaling");
    let cert = params
        .self_signed(&key)
        .context("self-signing the certificate")?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the generated key: {e}"))?;
    server_config(vec![cert.der().clone()], key_der)
}

/// A certificate chain and key from PEM files.
pub fn from_files(cert: &Path, key: &Path) -> Result<Tls> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: not a PEM private key", key.display()))?;
    server_config(certs, key)
}
