//! TLS for the RESP endpoint (rustls). Certificates come from PEM files; `shoal dev`
//! generates a self-signed pair under `.shoal/tls/`. [`TlsState::reload`] re-reads the files
//! (the process calls it on SIGHUP); connections already open keep their session.

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("bad PEM in {path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("{path} holds a placeholder, not a private key: put the PEM private key there")]
    Placeholder { path: PathBuf },
    #[error("certificate and key do not fit together: {0}")]
    Config(#[from] rustls::Error),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The current server configuration, swapped on reload.
pub struct TlsState {
    cert: PathBuf,
    key: PathBuf,
    config: RwLock<Arc<ServerConfig>>,
}

impl TlsState {
    pub fn load(cert: &Path, key: &Path) -> Result<TlsState, TlsError> {
        let config = server_config(cert, key)?;
        Ok(TlsState { cert: cert.into(), key: key.into(), config: RwLock::new(Arc::new(config)) })
    }

    /// Re-reads the certificate and key; on error the old ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert, &self.key)?;
        *self.config.write().unwrap() = Arc::new(config);
        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.read().unwrap().clone())
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source });
    let pem_err = |path: &Path, e: rustls_pki_types::pem::Error| TlsError::Pem {
        path: path.into(),
        detail: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, e))?;
    let key_pem = read(key)?;
    if shoal_types::is_placeholder(&String::from_utf8_lossy(&key_pem)) {
        return Err(TlsError::Placeholder { path: key.into() });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?)
}

/// Writes a self-signed certificate for `localhost`/`127.0.0.1` into `dir` unless one is
/// there; returns (cert, key) paths.
pub fn ensure_self_signed(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Read { path, source }
    };
    use std::os::unix::fs::PermissionsExt;
    let private = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
    };
    if cert_path.exists() && key_path.exists() {
        // The key (and its folder) private, also if an older install left them open.
        private(dir, 0o700)?;
        private(&key_path, 0o600)?;
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    private(dir, 0o700)?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(&cert_path, generated.cert.pem()).map_err(io(&cert_path))?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    std::io::Write::write_all(&mut f, generated.signing_key.serialize_pem().as_bytes())
        .map_err(io(&key_path))?;
    Ok((cert_path, key_path))
}
