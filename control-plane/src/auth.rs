//! REST authentication: bearer API keys, looked up by their SHA-256 hash, → a [`Principal`].

use crate::error::ApiError;
use crate::role::Role;
use crate::state::AppState;
use actix_web::{dev::Payload, web, FromRequest, HttpMessage, HttpRequest};
use shoal_types::AccountId;
use std::future::Future;
use std::pin::Pin;

/// Who is calling, and with what [`Role`]: admins everything; an account's owner that
/// account's caches, users, tokens, keys, usage, invoices and audit; auditors read (caches,
/// usage, invoices, audit) of one account, or of every account, and change nothing.
///
/// Objects of accounts a principal cannot see answer 404, never a 403 that confirms they exist.
#[derive(Clone, Debug)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
}

impl Principal {
    /// How the principal appears in audit records.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key_id)
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// The account whose objects list endpoints show; None = all accounts.
    pub fn scope(&self) -> Option<AccountId> {
        self.role.account().cloned()
    }

    /// Whether objects of `account` are visible.
    pub fn sees(&self, account: &AccountId) -> bool {
        match self.scope() {
            None => true,
            Some(mine) => &mine == account,
        }
    }

    /// Read access to an object of `account`: 404 when not visible.
    pub fn read(&self, account: &AccountId, what: &'static str) -> Result<(), ApiError> {
        if self.sees(account) {
            Ok(())
        } else {
            Err(ApiError::NotFound(what))
        }
    }

    /// Write access to an object of `account`: 404 when not visible, 403 for auditors.
    pub fn write(&self, account: &AccountId, what: &'static str) -> Result<(), ApiError> {
        self.read(account, what)?;
        self.writer()
    }

    /// Whether this principal may change anything at all.
    pub fn writer(&self) -> Result<(), ApiError> {
        if let Role::Auditor(_) = self.role {
            Err(ApiError::Forbidden)
        } else {
            Ok(())
        }
    }

    /// Only the platform admin.
    pub fn admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Principal, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let req = req.clone();
        let token = req
            .headers()
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        Box::pin(async move {
            let (Some(state), Some(token)) = (state, token) else { return Err(ApiError::Unauthorized) };
            let key = state
                .store
                .api_key_by_hash(&crate::secret::hash_token(&token))
                .await?
                .ok_or(ApiError::Unauthorized)?;
            let role = key.role.ok_or(ApiError::Unauthorized)?;
            let who = Principal { key_id: key.id, role };
            req.extensions_mut().insert(who.clone());
            Ok(who)
        })
    }
}
