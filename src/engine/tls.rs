//! TLS of every database connection, as the URI's `sslmode` asks (libpq's meanings), with the CA
//! from `sslrootcert` or from a Secret key named in the spec.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

/// `sslmode` of a URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    pub fn parse(text: &str) -> Option<TlsMode> {
        Some(match text {
            "disable" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server certificate's chain is checked.
    pub fn verifies(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

/// Where the trusted CA certificates come from.
#[derive(Clone, PartialEq, Eq)]
pub enum CaCert {
    /// `sslrootcert=/path` of the URI: read on each connect, as libpq does.
    File(PathBuf),
    /// PEM text from a Secret key; `origin` names it (`Secret "db-ca" key "ca.crt"`).
    Pem { pem: Arc<str>, origin: String },
}

impl fmt::Display for CaCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaCert::File(p) => write!(f, "sslrootcert {}", p.display()),
            CaCert::Pem { origin, .. } => f.write_str(origin),
        }
    }
}

impl fmt::Debug for CaCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode={mode}: cannot use the CA certificate of {ca}: {reason}")]
    Ca {
        mode: &'static str,
        ca: String,
        reason: String,
    },
    #[error(
        "sslmode={mode} needs a CA certificate (sslrootcert or a caSecretRef), and none is given"
    )]
    NoCa { mode: &'static str },
    #[error(
        "sslmode={mode}: cannot write the CA certificate of {ca} for the sqlx driver to {path}: {source}"
    )]
    Write {
        mode: &'static str,
        ca: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The TLS settings of one connection URI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// As written (`prefer` when the URI has none).
    pub mode: TlsMode,
    pub ca: Option<CaCert>,
}

impl TlsSettings {
    /// The mode connections use: `require` with a CA checks the chain, as libpq's `verify-ca`.
    pub fn effective(&self) -> TlsMode {
        match (self.mode, &self.ca) {
            (TlsMode::Require, Some(_)) => TlsMode::VerifyCa,
            (m, _) => m,
        }
    }

    /// What is wrong with the combination, with the fix; None when it is usable.
    pub fn problem(&self, ca_field: &str) -> Option<(String, String)> {
        match (self.mode, &self.ca) {
            (m, None) if m.verifies() => Some((
                format!(
                    "sslmode={} needs the CA certificate that signed the server's",
                    m.as_str()
                ),
                format!(
                    "add sslrootcert=/path/to/ca.crt to the URI, or name a Secret key holding the PEM in {ca_field}"
                ),
            )),
            (m @ (TlsMode::Disable | TlsMode::Prefer), Some(ca)) => Some((
                format!(
                    "a CA certificate is given ({ca}) but sslmode={} would not check the server against it",
                    m.as_str()
                ),
                "add sslmode=verify-full (or verify-ca) to the URI, or remove the CA".into(),
            )),
            _ => None,
        }
    }

    /// The rustls configuration of this connection's TLS (None for `disable`).
    pub fn client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
        let mode = self.effective();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.ca_error(format!("no TLS protocol version available ({e})")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, &self.ca) {
            (TlsMode::Disable, _) => return Ok(None),
            (TlsMode::VerifyCa | TlsMode::VerifyFull, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(self.ca_certificates(ca)?);
                if added == 0 {
                    return Err(self.ca_error("it holds no usable certificate".into()));
                }
                let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| self.ca_error(e.to_string()))?;
                Arc::new(Verifying {
                    inner,
                    mode,
                    ca: ca.to_string(),
                })
            }
            // Validation refuses this; never fall back to not checking.
            (TlsMode::VerifyCa | TlsMode::VerifyFull, None) => {
                return Err(TlsError::NoCa {
                    mode: mode.as_str(),
                });
            }
            // Encrypted, not checked, as libpq does without a root certificate.
            (TlsMode::Prefer | TlsMode::Require, _) => Arc::new(Unverified(provider)),
        };
        Ok(Some(Arc::new(
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth(),
        )))
    }

    fn ca_certificates(&self, ca: &CaCert) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let pem: Vec<u8> = match ca {
            CaCert::File(path) => {
                std::fs::read(path).map_err(|e| self.ca_error(format!("reading it: {e}")))?
            }
            CaCert::Pem { pem, .. } => pem.as_bytes().to_vec(),
        };
        CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.ca_error(format!("not PEM certificates ({e})")))
    }

    fn ca_error(&self, reason: String) -> TlsError {
        TlsError::Ca {
            mode: self.effective().as_str(),
            ca: self
                .ca
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "none".into()),
            reason,
        }
    }

    /// `sslmode` and `sslrootcert` query parameters for a sqlx URI (sqlx takes the CA as a file: a
    /// CA from a Secret is written to the temp dir, named by its SHA-256, readable by its owner).
    pub fn sqlx_params(&self) -> Result<String, TlsError> {
        let mode = self.effective();
        let mut out = format!("sslmode={}", mode.as_str());
        let path = match (&self.ca, mode.verifies()) {
            (Some(CaCert::File(p)), true) => p.clone(),
            (Some(CaCert::Pem { pem, origin }), true) => {
                write_pem(pem).map_err(|(path, source)| TlsError::Write {
                    mode: mode.as_str(),
                    ca: origin.clone(),
                    path,
                    source,
                })?
            }
            _ => return Ok(out),
        };
        out.push_str("&sslrootcert=");
        out.push_str(&percent_encode(&path.to_string_lossy()));
        Ok(out)
    }
}

/// Writes `pem` to `<temp>/philotes-ca-<sha256>.pem` unless it is there (content-addressed, so
/// concurrent writers write the same bytes; a rename makes it appear whole).
fn write_pem(pem: &str) -> Result<PathBuf, (String, std::io::Error)> {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(pem.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = std::env::temp_dir().join(format!("philotes-ca-{hex}.pem"));
    if std::fs::read(&path).is_ok_and(|have| have == pem.as_bytes()) {
        return Ok(path);
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let fail = |e| (path.display().to_string(), e);
    std::fs::write(&tmp, pem).map_err(fail)?;
    std::fs::rename(&tmp, &path).map_err(fail)?;
    Ok(path)
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; None for a malformed one or text that is not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a certificate was refused, in words that name the mode and what to check.
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Checks the chain against the CA; with `verify-full` also the host name (DNS or IP SAN).
#[derive(Debug)]
struct Verifying {
    inner: Arc<WebPkiServerVerifier>,
    mode: TlsMode,
    ca: String,
}

impl ServerCertVerifier for Verifying {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mode = self.mode.as_str();
        let why = match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(ok) => return Ok(ok),
            // The chain is checked before the name: a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.mode == TlsMode::VerifyCa => return Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => format!(
                "the server certificate is not valid for host name {} (verify-full checks the name the URI connects to; use a host name the certificate names, or sslmode=verify-ca)",
                server_name.to_str()
            ),
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
                "the server certificate is not signed by the CA of {}",
                self.ca
            ),
            Err(rustls::Error::InvalidCertificate(e)) => {
                format!("the server certificate is refused ({e:?})")
            }
            Err(e) => return Err(e),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(Refused(format!("sslmode={mode}: {why}")))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any server certificate but still checks the handshake signatures (`prefer`, `require`
/// without a CA).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_their_problems() {
        let ca = CaCert::Pem {
            pem: "x".into(),
            origin: "Secret \"ca\" key \"ca.crt\"".into(),
        };
        let with = |mode, ca: Option<CaCert>| TlsSettings { mode, ca };
        assert_eq!(
            with(TlsMode::Require, Some(ca.clone())).effective(),
            TlsMode::VerifyCa
        );
        assert_eq!(with(TlsMode::Require, None).effective(), TlsMode::Require);
        assert!(
            with(TlsMode::VerifyFull, None)
                .problem("spec.source.tls.caSecretRef")
                .is_some()
        );
        assert!(
            with(TlsMode::Prefer, Some(ca.clone()))
                .problem("f")
                .is_some()
        );
        assert!(with(TlsMode::VerifyCa, Some(ca)).problem("f").is_none());
        // verify-* without a CA never connects unchecked.
        let e = with(TlsMode::VerifyFull, None).client_config().unwrap_err();
        assert!(e.to_string().contains("sslmode=verify-full"), "{e}");
        assert!(
            with(TlsMode::Disable, None)
                .client_config()
                .unwrap()
                .is_none()
        );
        assert_eq!(percent_decode("%2Ftmp%2Fa+b"), Some("/tmp/a+b".into()));
        assert_eq!(percent_encode("/tmp/a b"), "/tmp/a%20b");
        assert_eq!(percent_decode("%zz"), None);
    }
}
