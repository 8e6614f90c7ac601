//! Data-plane token signing: Ed25519 keys (EdDSA JWTs), kept in the store, published as a
//! JWKS. The newest key signs; rotated-out keys keep verifying until every token they
//! signed has expired. The store is the one source of truth: every control-plane process
//! over it reloads the keys ([`Signer::refresh`]) before it signs and before it serves the
//! JWKS, so a rotation made by one is followed by all at once.

use crate::store::audit::AuditEvent;
use crate::store::{SigningKeyRecord, Store, StoreError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use shoal_types::DataClaims;

pub struct Signer {
    keys: std::sync::RwLock<Keys>,
    /// How long a retired key keeps verifying: the longest token lifetime plus leeway.
    verify_window: chrono::Duration,
}

struct Keys {
    kid: String,
    encoding: EncodingKey,
    /// Every key, oldest first, with when it was retired (None: the signing key).
    public: Vec<(String, Vec<u8>, Option<chrono::DateTime<chrono::Utc>>)>,
}

/// One JSON Web Key, as served at `/.well-known/jwks.json`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Jwk {
    pub kty: &'static str,
    pub crv: &'static str,
    pub alg: &'static str,
    #[serde(rename = "use")]
    pub use_: &'static str,
    pub kid: String,
    pub x: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Signer {
    /// Loads the keys from the store, creating the first one if there is none. Retired keys
    /// are published for `verify_window` after their retirement.
    pub async fn load_or_create(
        store: &Store,
        verify_window: std::time::Duration,
    ) -> Result<Signer, StoreError> {
        if store.signing_keys().await?.is_empty() {
            store.insert_signing_key(&generate()).await?;
        }
        let signer = Signer {
            keys: std::sync::RwLock::new(Keys::load(store).await?),
            verify_window: chrono::Duration::from_std(verify_window).unwrap_or(chrono::Duration::days(1)),
        };
        Ok(signer)
    }

    /// A new key signs from now on; the others are retired (they keep verifying for the
    /// verify window). Audited with `event` in the same transaction. Returns the new kid.
    pub async fn rotate(&self, store: &Store, event: &mut AuditEvent) -> Result<String, StoreError> {
        let key = generate();
        event.target = key.kid.clone();
        let mut tx = store.begin().await?;
        crate::store::users::insert_signing_key(tx.conn(), &key).await?;
        crate::store::users::retire_signing_keys(tx.conn(), &key.kid).await?;
        tx.commit(event).await?;
        *self.keys.write().unwrap() = Keys::load(store).await?;
        Ok(key.kid)
    }

    /// Reloads the keys from the store: another control-plane process may have rotated.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let keys = Keys::load(store).await?;
        *self.keys.write().unwrap() = keys;
        Ok(())
    }

    /// The kid that signs now.
    #[cfg(test)]
    pub fn current_kid(&self) -> String {
        self.keys.read().unwrap().kid.clone()
    }

    pub fn sign(&self, claims: &DataClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let keys = self.keys.read().unwrap();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(keys.kid.clone());
        jsonwebtoken::encode(&header, claims, &keys.encoding)
    }

    /// The keys gateways should accept: the signing key and those retired less than the
    /// verify window ago.
    pub fn jwks(&self) -> Jwks {
        let now = chrono::Utc::now();
        let keys = self.keys.read().unwrap();
        Jwks {
            keys: keys
                .public
                .iter()
                .filter(|(_, _, retired)| retired.is_none_or(|at| at + self.verify_window > now))
                .map(|(kid, raw, _)| Jwk {
                    kty: "OKP",
                    crv: "Ed25519",
                    alg: "EdDSA",
                    use_: "sig",
                    kid: kid.clone(),
                    x: URL_SAFE_NO_PAD.encode(raw),
                })
                .collect(),
        }
    }
}

impl Keys {
    async fn load(store: &Store) -> Result<Keys, StoreError> {
        let keys = store.signing_keys_with_retirement().await?;
        // The signing key: the newest one not retired (the newest one if all are).
        let signing = keys
            .iter()
            .rev()
            .find(|(_, retired)| retired.is_none())
            .or(keys.last())
            .map(|(k, _)| k.clone())
            .expect("at least one key");
        Ok(Keys {
            kid: signing.kid.clone(),
            encoding: EncodingKey::from_ed_der(&signing.private_der),
            public: keys
                .into_iter()
                .map(|(k, retired)| {
                    let retired = retired
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                        .map(|t| t.with_timezone(&chrono::Utc));
                    (k.kid, k.public_raw, retired)
                })
                .collect(),
        })
    }
}

fn generate() -> SigningKeyRecord {
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let der = key.to_pkcs8_der().expect("an Ed25519 key always encodes");
    SigningKeyRecord {
        kid: format!("k{}", &crate::secret::random_token(6)),
        private_der: der.as_bytes().to_vec(),
        public_raw: key.verifying_key().to_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two control planes over one store (two pools on one SQLite file, as two processes
    /// would have): a rotation made by one is what the other signs with and publishes.
    #[tokio::test]
    async fn a_rotation_by_one_control_plane_is_followed_by_another_over_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let (store_a, store_b) = (Store::open(&url).await.unwrap(), Store::open(&url).await.unwrap());
        let window = std::time::Duration::from_secs(3600);
        let a = Signer::load_or_create(&store_a, window).await.unwrap();
        let b = Signer::load_or_create(&store_b, window).await.unwrap();
        let first = a.current_kid();
        assert_eq!(b.current_kid(), first);

        let mut event =
            AuditEvent { actor: "test".into(), action: "signing_key.rotate".into(), ..Default::default() };
        let rotated = a.rotate(&store_a, &mut event).await.unwrap();
        assert_ne!(rotated, first);

        b.refresh(&store_b).await.unwrap();
        assert_eq!(b.current_kid(), rotated);
        let claims = DataClaims {
            iss: "shoal".into(),
            sub: "c".into(),
            aud: "shoal-data".into(),
            iat: 0,
            exp: i64::MAX / 2,
            nbf: None,
            jti: "j".into(),
            cache: shoal_types::CacheId::generate(),
            perm: Default::default(),
            key_patterns: vec![],
        };
        let token = b.sign(&claims).unwrap();
        assert_eq!(jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(), Some(rotated.as_str()));
        let published: Vec<String> = b.jwks().keys.into_iter().map(|k| k.kid).collect();
        assert_eq!(published, vec![first, rotated]);
    }
}
