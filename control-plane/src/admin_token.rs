//! The bootstrap admin token: the file (`admin_token_path`, mode 0600) that holds the first
//! platform admin's bearer token, and its key in the store (named [`BOOTSTRAP_KEY_NAME`]).
//!
//! - At startup the token in the file is reused (its hash inserted if the store lacks it; a
//!   token revoked in the store stays revoked). Without a file, a new token is written and
//!   every earlier live bootstrap admin key is revoked, so a restart never leaves an old
//!   admin token valid.
//! - `shoal admin rotate-token` writes a new token and revokes the earlier bootstrap keys
//!   (the running control plane answers 401 to the old token at once: keys are looked up on
//!   every request).
//!
//! Either way the new token is written to a temporary file first, the store changes and its
//! audit record commit together, and only then does the file replace the old one.

use crate::role::Role;
use crate::secret::{hash_token, random_token};
use crate::store::audit::AuditEvent;
use crate::store::{accounts, Store, StoreError};
use std::path::{Path, PathBuf};

/// The name of bootstrap admin keys (API-created keys may not take it).
pub use crate::store::accounts::BOOTSTRAP_KEY_NAME;

/// What [`install_new`] did.
#[derive(Debug)]
pub struct Installed {
    pub key_id: String,
    /// How many earlier bootstrap admin keys it revoked.
    pub revoked: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AdminTokenError + '_ {
    move |source| AdminTokenError::Io { path: path.to_path_buf(), source }
}

/// Makes sure the token in `path` works, writing a new one (and revoking earlier bootstrap
/// keys) when there is none.
pub async fn bootstrap(store: &Store, path: &Path) -> Result<(), AdminTokenError> {
    // Readable by its owner only, also if an older install left it open.
    shoal_engine::private::tighten(path).map_err(io(path))?;
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            let token = t.trim();
            let hash = hash_token(token);
            let id = format!("key-{}", random_token(6));
            let key = accounts::NewApiKey {
                id: &id,
                token_hash: &hash,
                role: &Role::Admin,
                name: BOOTSTRAP_KEY_NAME,
                expires_at: None,
            };
            accounts::insert_api_key(&mut *store.pool.acquire().await?, &key).await?;
            if store.api_key_by_hash(&hash).await?.is_none() {
                tracing::warn!(path = %path.display(),
                    "the admin token in this file is revoked; run `shoal admin rotate-token` for a new one");
            }
            Ok(())
        }
        _ => {
            let installed = install_new(store, path, "system", "admin_token.bootstrap").await?;
            tracing::info!(path = %path.display(), key = %installed.key_id, revoked = installed.revoked,
                "wrote a new bootstrap admin token");
            Ok(())
        }
    }
}

/// Writes a new admin token to `path`, stores its key and revokes every earlier live
/// bootstrap admin key, audited as `action` by `actor`.
pub async fn install_new(
    store: &Store,
    path: &Path,
    actor: &str,
    action: &str,
) -> Result<Installed, AdminTokenError> {
    let token = format!("shoal_admin_{}", random_token(24));
    let key_id = format!("key-{}", random_token(6));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            shoal_engine::private::tighten(dir).map_err(io(dir))?;
        }
    }
    let tmp = path.with_extension(format!("tmp-{}", random_token(4)));
    write_private(&tmp, &format!("{token}\n")).map_err(io(&tmp))?;
    let result = async {
        let mut tx = store.begin().await?;
        // The insert first: on SQLite it takes the write lock before the audit append reads
        // the chain's tail, so another process's append cannot interleave.
        let hash = hash_token(&token);
        let key = accounts::NewApiKey {
            id: &key_id,
            token_hash: &hash,
            role: &Role::Admin,
            name: BOOTSTRAP_KEY_NAME,
            expires_at: None,
        };
        accounts::insert_api_key(tx.conn(), &key).await?;
        let revoked = accounts::revoke_bootstrap_keys(tx.conn(), &key_id).await?;
        let event = AuditEvent {
            actor: actor.into(),
            source: "local".into(),
            action: action.into(),
            target: key_id.clone(),
            outcome: "success".into(),
            request_id: format!("req-{}", random_token(8)),
            details: serde_json::json!({ "revoked_bootstrap_keys": revoked, "path": path.display().to_string() }),
            ..Default::default()
        };
        tx.commit(&event).await?;
        Ok::<u64, StoreError>(revoked)
    }
    .await;
    let revoked = match result {
        Ok(revoked) => revoked,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(Installed { key_id, revoked })
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()
}
