//! Data-plane token signing: Ed25519 keys (EdDSA JWTs), kept in the store, published as a
//! JWKS. The newest key signs; older keys keep verifying until removed.

use crate::store::{SigningKeyRecord, Store, StoreError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use shoal_types::DataClaims;

pub struct Signer {
    kid: String,
    encoding: EncodingKey,
    /// Every key gateways should accept, newest last.
    public: Vec<(String, Vec<u8>)>,
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
    /// Loads the keys from the store, creating the first one if there is none.
    pub async fn load_or_create(store: &Store) -> Result<Signer, StoreError> {
        let mut keys = store.signing_keys().await?;
        if keys.is_empty() {
            let key = generate();
            store.insert_signing_key(&key).await?;
            keys.push(key);
        }
        let newest = keys.last().expect("at least one key");
        Ok(Signer {
            kid: newest.kid.clone(),
            encoding: EncodingKey::from_ed_der(&newest.private_der),
            public: keys.iter().map(|k| (k.kid.clone(), k.public_raw.clone())).collect(),
        })
    }

    pub fn sign(&self, claims: &DataClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }

    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self
                .public
                .iter()
                .map(|(kid, raw)| Jwk {
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

fn generate() -> SigningKeyRecord {
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let der = key.to_pkcs8_der().expect("an Ed25519 key always encodes");
    SigningKeyRecord {
        kid: format!("k{}", &crate::auth::random_token(6)),
        private_der: der.as_bytes().to_vec(),
        public_raw: key.verifying_key().to_bytes().to_vec(),
    }
}
