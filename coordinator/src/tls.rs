//! Transport security: rustls (aws-lc-rs) on the gRPC and HTTP listeners, mutual TLS between
//! coordinators, and a small certificate authority for test clusters (`davit cluster certs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// Certificate files named in a node's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// The CA that signed every coordinator's certificate; peers must present a certificate
    /// it signed (mutual TLS).
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}; check the [tls] section of the node config")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no usable {what}; expected PEM")]
    Pem { path: PathBuf, what: &'static str },
    #[error("TLS configuration error: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// Loaded certificate material, shared by the servers and the clients of one node.
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl TlsMaterial {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let material = Self { ca_pem: read(&files.ca_file)?, cert_pem: read(&files.cert_file)?, key_pem: read(&files.key_file)? };
        // Fail at start-up, with the file name, rather than on the first connection.
        if CertificateDer::pem_slice_iter(&material.ca_pem).next().is_none() {
            return Err(TlsError::Pem { path: files.ca_file.clone(), what: "CA certificate" });
        }
        if CertificateDer::pem_slice_iter(&material.cert_pem).next().is_none() {
            return Err(TlsError::Pem { path: files.cert_file.clone(), what: "certificate" });
        }
        if PrivateKeyDer::from_pem_slice(&material.key_pem).is_err() {
            return Err(TlsError::Pem { path: files.key_file.clone(), what: "private key" });
        }
        Ok(material)
    }

    /// tonic server config: our identity, and peers must present a certificate signed by the CA.
    pub fn tonic_server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    pub fn client(&self) -> ClientTls {
        ClientTls { ca_pem: self.ca_pem.clone(), cert_pem: self.cert_pem.clone(), key_pem: self.key_pem.clone() }
    }

    /// rustls server config for the HTTP listener. Browsers and the CLI are not asked for a
    /// client certificate there; users authenticate with tokens.
    pub fn rustls_http_server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&self.cert_pem).collect::<Result<_, _>>().map_err(|e| TlsError::Config(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }
}

/// What a coordinator presents when it calls another.
pub struct ClientTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl ClientTls {
    pub fn tonic_config(&self, grpc_addr: &str) -> tonic::transport::ClientTlsConfig {
        let host = grpc_addr.rsplit_once(':').map_or(grpc_addr, |(host, _)| host).trim_matches(['[', ']']);
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host.to_string())
    }
}

/// Make a CA and one certificate per node in `out_dir`: `ca.pem`, `ca-key.pem`, and
/// `node-<id>.pem` / `node-<id>-key.pem` valid for the given host names and addresses.
pub fn generate_cluster_certs(out_dir: &Path, nodes: &[(u64, Vec<String>)]) -> Result<Vec<PathBuf>, TlsError> {
    let config_error = |e: rcgen::Error| TlsError::Config(e.to_string());
    std::fs::create_dir_all(out_dir).map_err(|source| TlsError::Read { path: out_dir.to_path_buf(), source })?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(config_error)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "davit cluster CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_key = rcgen::KeyPair::generate().map_err(config_error)?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(config_error)?;
    let mut written = Vec::new();
    let mut write = |name: String, contents: String| -> Result<(), TlsError> {
        let path = out_dir.join(name);
        std::fs::write(&path, contents).map_err(|source| TlsError::Read { path: path.clone(), source })?;
        written.push(path);
        Ok(())
    };
    write("ca.pem".into(), ca.pem())?;
    for (node_id, names) in nodes {
        let mut params = rcgen::CertificateParams::new(names.clone()).map_err(config_error)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("davit node {node_id}"));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().map_err(config_error)?;
        let cert = params.signed_by(&key, &ca).map_err(config_error)?;
        write(format!("node-{node_id}.pem"), cert.pem())?;
        write(format!("node-{node_id}-key.pem"), key.serialize_pem())?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load() {
        let dir = tempfile::tempdir().unwrap();
        generate_cluster_certs(dir.path(), &[(1, vec!["127.0.0.1".into(), "localhost".into()])]).unwrap();
        let files = TlsFiles {
            ca_file: dir.path().join("ca.pem"),
            cert_file: dir.path().join("node-1.pem"),
            key_file: dir.path().join("node-1-key.pem"),
        };
        let material = TlsMaterial::load(&files).unwrap();
        material.rustls_http_server().unwrap();
        let missing = TlsFiles { ca_file: dir.path().join("nope.pem"), ..files };
        let error = TlsMaterial::load(&missing).err().unwrap().to_string();
        assert!(error.contains("nope.pem"), "{error}");
    }
}
