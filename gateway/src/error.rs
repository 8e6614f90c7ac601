//! Gateway errors. Each has a client-safe RESP message; internal details go to logs only.

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("unknown cache")]
    UnknownCache,
    #[error("control plane unreachable: {0}")]
    ControlPlane(String),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("upstream refused the cache's credentials")]
    UpstreamAuth,
    #[error("the cache has too many connections")]
    TooManyConnections,
    #[error("too many failed attempts")]
    LockedOut,
    /// The login could not be checked (the LDAP directory is down): fail closed.
    #[error("login directory unavailable: {0}")]
    DirectoryUnavailable(String),
}

impl GatewayError {
    /// The RESP error (without `-` and CRLF) a client gets.
    pub fn client_message(&self) -> &'static str {
        match self {
            GatewayError::Auth(_) | GatewayError::UnknownCache | GatewayError::UpstreamAuth => {
                "WRONGPASS invalid username-password pair or user is disabled."
            }
            GatewayError::ControlPlane(_) => "ERR authentication service unavailable, try again",
            GatewayError::Upstream(_) => "ERR cache temporarily unavailable, try again",
            GatewayError::TooManyConnections => "ERR max number of clients reached for this cache",
            GatewayError::LockedOut => {
                "WRONGPASS too many failed attempts from this address or for this user; try again later"
            }
            GatewayError::DirectoryUnavailable(_) => {
                "ERR the login directory (LDAP) is unavailable; try again later"
            }
        }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::Auth(_) => "auth",
            GatewayError::UnknownCache => "unknown_cache",
            GatewayError::ControlPlane(_) => "control_plane",
            GatewayError::Upstream(_) => "upstream",
            GatewayError::UpstreamAuth => "upstream_auth",
            GatewayError::TooManyConnections => "too_many_connections",
            GatewayError::LockedOut => "locked_out",
            GatewayError::DirectoryUnavailable(_) => "directory_unavailable",
        }
    }

    /// Whether the client, not the platform, is at fault (counts towards throttling).
    pub fn is_credential_failure(&self) -> bool {
        matches!(self, GatewayError::Auth(_) | GatewayError::UnknownCache)
    }
}
