//! Extra CA certificates trusted for provider calls, besides the built-in web PKI roots: for a
//! corporate TLS proxy in front of the providers, and for tests serving fake providers over https
//! with a throwaway CA. They add trust; they never relax the https-only rule.

use std::path::Path;

use super::ValidatorError;

/// PEM certificates from one file (`--extra-ca-bundle`), checked when read.
#[derive(Clone, Debug)]
pub struct ExtraRoots {
    /// Where they came from (for messages).
    source: String,
    certificates: Vec<reqwest::Certificate>,
    /// The PEM text as read (passed on to retriever pods in their session Secret).
    pem: Vec<u8>,
}

impl ExtraRoots {
    /// Reads a PEM bundle file. A missing, unreadable or certificate-less file is an error naming it.
    pub fn read(path: &Path) -> Result<Self, ValidatorError> {
        let pem = std::fs::read(path).map_err(|e| {
            ValidatorError::CaBundle(format!("cannot read the extra CA bundle {}: {e}", path.display()))
        })?;
        Self::from_pem(path.display().to_string(), &pem)
    }

    /// Parses PEM text holding one or more certificates; `source` names it in errors.
    pub fn from_pem(source: impl Into<String>, pem: &[u8]) -> Result<Self, ValidatorError> {
        let source = source.into();
        let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            ValidatorError::CaBundle(format!(
                "the extra CA bundle {source} is not valid PEM: {}",
                error_chain(&e)
            ))
        })?;
        if certificates.is_empty() {
            return Err(ValidatorError::CaBundle(format!(
                "the extra CA bundle {source} holds no certificate (expected PEM blocks: -----BEGIN CERTIFICATE-----)"
            )));
        }
        // The certificates are only parsed when a client is built: build one per certificate now,
        // so a bad one is named here rather than failing later as "builder error".
        for (index, certificate) in certificates.iter().enumerate() {
            reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(certificate.clone())
                .build()
                .map_err(|e| {
                    ValidatorError::CaBundle(format!(
                        "certificate {} of the extra CA bundle {source} is not a usable X.509 CA certificate: {}",
                        index + 1,
                        error_chain(&e)
                    ))
                })?;
        }
        Ok(ExtraRoots {
            source,
            certificates,
            pem: pem.to_vec(),
        })
    }

    /// Where the certificates came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The PEM text of the bundle.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// How many certificates the bundle holds.
    pub fn len(&self) -> usize {
        self.certificates.len()
    }

    /// Always false: an empty bundle is refused when read.
    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty()
    }

    /// Adds the certificates to a client being built (the built-in roots stay trusted).
    pub(crate) fn trust_in(&self, mut builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        for certificate in &self.certificates {
            builder = builder.add_root_certificate(certificate.clone());
        }
        builder
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_without_certificates_is_refused_naming_the_source() {
        let err = ExtraRoots::from_pem("ca.pem", b"hello\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca.pem") && err.contains("holds no certificate"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_block_that_is_not_a_certificate_is_refused() {
        let pem = b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
        let err = ExtraRoots::from_pem("ca.pem", pem).unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
    }

    #[test]
    fn a_missing_file_is_refused_with_the_os_error() {
        let err = ExtraRoots::read(Path::new("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/ca.pem") && err.contains("No such file"),
            "{err}"
        );
    }
}
