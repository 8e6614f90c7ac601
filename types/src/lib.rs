//! Typed ids and wire types shared by the control plane, the gateway and the engine.
//!
//! Keeping them here lets the crates talk without depending on each other's internals.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

pub mod throttle;

/// Why a string is not a valid id.
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind} id {value:?}")]
pub struct InvalidId {
    kind: &'static str,
    value: String,
}

macro_rules! typed_id {
    ($name:ident, $prefix:literal, $kind:literal) => {
        #[doc = concat!("A ", $kind, " id: `", $prefix, "` followed by 12 lowercase hex digits.")]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A fresh random id.
            pub fn generate() -> Self {
                let n: u64 = rand::thread_rng().gen::<u64>() & 0xffff_ffff_ffff;
                Self(format!("{}{:012x}", $prefix, n))
            }

            /// Accepts only ids this type could have generated.
            pub fn parse(s: &str) -> Result<Self, InvalidId> {
                let rest = s.strip_prefix($prefix);
                match rest {
                    Some(hex)
                        if hex.len() == 12
                            && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
                    {
                        Ok(Self(s.to_owned()))
                    }
                    _ => Err(InvalidId { kind: $kind, value: s.chars().take(64).collect() }),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

typed_id!(CacheId, "c", "cache");
typed_id!(AccountId, "a", "account");

impl CacheId {
    /// The Valkey ACL user of this cache on its node; also its pub/sub channel prefix (`t<id>:`).
    pub fn acl_user(&self) -> String {
        format!("t{}", self.0)
    }
}

/// Where a cache lives, as the gateway needs it to open an upstream connection.
/// Served by the control plane's internal API; contains the ACL password, never shown to tenants.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantRoute {
    pub cache_id: CacheId,
    pub cache_name: String,
    /// `host:port` of the Valkey node (for a cache in a cluster pool: one of its nodes).
    pub node_addr: String,
    /// For a cache in a cluster pool: `host:port` of every node of the cluster, replicas
    /// included (any of them tells the gateway the slot map). Empty for a standalone pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_nodes: Vec<String>,
    /// The first Valkey database of the cache; the cache's database `i` is `db + i`.
    pub db: u32,
    /// How many numbered databases the cache may use.
    pub databases: u32,
    pub acl_user: String,
    pub acl_password: String,
    /// The node's read-only observer user, for the node-wide views (INFO, PUBSUB) the
    /// gateway filters down to this cache.
    pub observer_user: String,
    pub observer_password: String,
    /// The cache's keyspace-notification flags (`notify-keyspace-events` syntax; "" = off).
    #[serde(default)]
    pub keyspace_events: String,
    /// Usage limits the gateway enforces (ECPU/s, connections) and the storage cap.
    #[serde(default)]
    pub limits: CacheLimits,
    /// Set by the control plane while the cache is over `data_storage_mb` even after
    /// evicting keys with a TTL: the gateway then refuses writes with `-OOM`.
    #[serde(default)]
    pub storage_full: bool,
    /// The cache's stored bytes at its last storage sample (0 before the first), and when
    /// that sample started (Unix ms; 0 = none yet). The gateway adds the bytes of writes it
    /// forwarded since then, so a burst cannot outrun the sampler (see `LiveRoute`).
    #[serde(default)]
    pub storage_bytes: u64,
    #[serde(default)]
    pub storage_sampled_at_ms: i64,
    /// The cache's eviction policy (`volatile-lru`, `allkeys-lru`, … or `noeviction`): at its
    /// limit, whether a write may wait for eviction (every policy but `noeviction`).
    #[serde(default)]
    pub eviction_policy: String,
    /// The cache has its node to itself (a dedicated cache): it may run the node-wide
    /// commands shared caches are refused (functions, Search indexes).
    #[serde(default)]
    pub dedicated: bool,
}

/// A cache's usage limits, like ElastiCache Serverless' `CacheUsageLimits`. `None` = unlimited.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheLimits {
    /// ECPU per second (a token bucket at each gateway, holding its share of the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecpu_per_second: Option<u64>,
    /// Stored data, in MB (10^6 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_storage_mb: Option<u64>,
    /// Concurrent client connections, over all gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// What is metered, summed per cache over a period (a session's tally, a minute, an hour).
/// Money-relevant quantities are integers (milli-ECPU, bytes) so sums are exact.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageCounters {
    /// Metered commands (free ones are not counted).
    pub commands: u64,
    pub ecpu_milli: u64,
    /// Bytes the clients sent and received.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Reads that found their key, and that did not.
    pub hits: u64,
    pub misses: u64,
    /// Commands refused by the cache's `ecpu_per_second` limit.
    pub throttled: u64,
    /// Error replies.
    pub errors: u64,
}

impl UsageCounters {
    /// The counters' names, as columns and JSON fields, in the order of [`Self::values`].
    pub const NAMES: [&'static str; 8] =
        ["commands", "ecpu_milli", "bytes_in", "bytes_out", "hits", "misses", "throttled", "errors"];

    pub fn values(&self) -> [u64; 8] {
        [
            self.commands,
            self.ecpu_milli,
            self.bytes_in,
            self.bytes_out,
            self.hits,
            self.misses,
            self.throttled,
            self.errors,
        ]
    }

    /// Counters from values in the order of [`Self::NAMES`].
    pub fn from_values(v: [u64; 8]) -> UsageCounters {
        let [commands, ecpu_milli, bytes_in, bytes_out, hits, misses, throttled, errors] = v;
        UsageCounters { commands, ecpu_milli, bytes_in, bytes_out, hits, misses, throttled, errors }
    }

    #[inline]
    pub fn add(&mut self, o: &UsageCounters) {
        let (a, b) = (self.values(), o.values());
        *self = UsageCounters::from_values(std::array::from_fn(|i| a[i] + b[i]));
    }

    pub fn is_zero(&self) -> bool {
        *self == UsageCounters::default()
    }
}

/// Counters of one cache over one minute, as a gateway metered them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheUsage {
    pub cache_id: CacheId,
    /// Start of the minute (Unix seconds, a multiple of 60) the commands ran in.
    pub minute: i64,
    #[serde(flatten)]
    pub counters: UsageCounters,
    /// Most client connections the cache had open at once on this gateway during the
    /// batch's interval (about a second). Not a counter: the control plane keeps the
    /// largest per gateway and minute. Absent (0) in batches from older gateways.
    #[serde(default)]
    pub peak_connections: u32,
}

/// What a gateway posts to the control plane every second. `(gateway_id, seq)` is unique:
/// the control plane stores a batch once, however often it is sent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageBatch {
    pub gateway_id: String,
    pub seq: u64,
    pub usage: Vec<CacheUsage>,
}

/// Permissions a data-plane token grants.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    #[default]
    ReadWrite,
    ReadOnly,
}

impl Permission {
    /// As in JSON: `read-write` or `read-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ReadWrite => "read-write",
            Permission::ReadOnly => "read-only",
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        [Permission::ReadWrite, Permission::ReadOnly].into_iter().find(|p| p.as_str() == s)
    }
}

/// Claims of a data-plane JWT (what `AUTH <token>` presents to the gateway).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub jti: String,
    pub cache: CacheId,
    #[serde(default)]
    pub perm: Permission,
    /// Valkey glob patterns of the keys the token may touch; empty (or absent, in tokens
    /// minted before patterns existed): all keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_patterns: Vec<String>,
}

/// Issuer and audience of data-plane tokens; the gateway pins both.
/// The shortest script time limit an engine accepts: a script the engine ended by force
/// (past its limit) had run at least this long, so the gateway can tell such an end from a
/// node that went away under a young script (a failover, a crash).
pub const MIN_SCRIPT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_millis(100);

pub const TOKEN_ISSUER: &str = "shoal";
pub const DATA_AUDIENCE: &str = "shoal-data";
/// The audience of tokens that grant less than everything (read-only, or some keys): a
/// gateway that predates permissions pins [`DATA_AUDIENCE`] and so refuses them, rather
/// than let them do everything.
pub const LIMITED_DATA_AUDIENCE: &str = "shoal-data-limited";

/// A gateway's credential for the control plane's internal API: `sgw_<name>_<64 hex digits>`
/// (the name says which gateway; the control plane keeps only a hash). Made by
/// `shoal admin gateway create <name>` or `POST /v1/gateways`.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayCredential {
    name: String,
    text: String,
}

/// Hex digits of a credential's secret part (256 bits).
const CREDENTIAL_SECRET_HEX: usize = 64;

impl GatewayCredential {
    /// A new random credential for gateway `name` (see [`valid_gateway_name`]).
    pub fn generate(name: &str) -> GatewayCredential {
        let secret: [u8; CREDENTIAL_SECRET_HEX / 2] = rand::thread_rng().gen();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        GatewayCredential { name: name.to_owned(), text: format!("sgw_{name}_{hex}") }
    }

    /// Accepts only what [`generate`](Self::generate) makes; the error says what is wrong
    /// (a placeholder, a short secret) and never repeats the text.
    pub fn parse(text: &str) -> Result<GatewayCredential, CredentialError> {
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        let placeholder =
            ["change", "replace", "example", "placeholder", "secret", "password", "xxx", "todo"];
        if text.is_empty() {
            return Err(CredentialError::Missing);
        }
        let Some((name, secret)) = text.strip_prefix("sgw_").and_then(|rest| rest.split_once('_')) else {
            return Err(match placeholder.iter().any(|p| lower.contains(p)) || is_placeholder(text) {
                true => CredentialError::Placeholder,
                false => CredentialError::Malformed,
            });
        };
        if !valid_gateway_name(name)
            || !secret.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(CredentialError::Malformed);
        }
        if secret.len() < CREDENTIAL_SECRET_HEX {
            return Err(CredentialError::Short);
        }
        if secret.len() > CREDENTIAL_SECRET_HEX {
            return Err(CredentialError::Malformed);
        }
        Ok(GatewayCredential { name: name.to_owned(), text: text.to_owned() })
    }

    /// The gateway this credential names.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The whole credential (what the gateway sends as its bearer token).
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for GatewayCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayCredential").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Why a string is no gateway credential.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("is not set")]
    Missing,
    #[error("is a placeholder, not a credential")]
    Placeholder,
    #[error("is too short (its secret must be 64 hex digits)")]
    Short,
    #[error("is not a gateway credential (sgw_<name>_<64 hex digits>)")]
    Malformed,
}

/// Whether `text`, read where a secret belongs (a key, token, credential or secret file),
/// is a placeholder left from an example rather than a secret: `CHANGE_ME`, `changeme`,
/// `<your token here>`, `REPLACE_WITH_…`, `${ADMIN_TOKEN}`… A PEM file is judged by its
/// body (the lines between `-----BEGIN` and `-----END`). Random secrets (hex, base64, PEM)
/// never look like one: every word below is longer than the odds allow, or not hex.
pub fn is_placeholder(text: &str) -> bool {
    let body: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("-----")).collect();
    let body = body.join("\n");
    let text = body.trim();
    if text.is_empty() {
        return false;
    }
    if text.starts_with('<') || text.starts_with("${") || text.starts_with("$(") {
        return true;
    }
    let words: String =
        text.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    const STARTS: [&str; 12] = [
        "changeme",
        "changeit",
        "replace",
        "placeholder",
        "fixme",
        "todo",
        "insert",
        "yoursecret",
        "yourtoken",
        "yourkey",
        "example",
        "xxxx",
    ];
    const WHOLE: [&str; 6] = ["secret", "password", "token", "credential", "key", "test"];
    STARTS.iter().any(|w| words.starts_with(w)) || WHOLE.contains(&words.as_str())
}

/// Whether `host:port` (or a bare host) names only this machine: `localhost` or a loopback
/// IP. Plain HTTP between gateways and the control plane is allowed there only.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().is_loopback();
    }
    if let Ok(ip) = addr.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Gateway names: 1–63 characters of `a-z`, `0-9` and `-`, starting with a letter or digit.
pub fn valid_gateway_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// Gateway → control plane (`POST /internal/v1/caches/{id}/users/verify`): check the
/// password of a cache user or of an LDAP user with a role on the cache.
#[derive(Clone, Serialize, Deserialize)]
pub struct VerifyRequest {
    pub username: String,
    pub password: String,
    /// The client's address: the control plane throttles failures per (user, source).
    pub source: String,
}

impl fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("username", &self.username)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A verified login: the upstream Valkey ACL user the gateway connects as for it, whose
/// rules hold the user's access string (also inside scripts).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifiedLogin {
    /// `cache-user` or `ldap`.
    pub mechanism: String,
    pub username: String,
    pub upstream_user: String,
    pub upstream_password: String,
    /// The account owning the cache (for audit records).
    pub account_id: AccountId,
    /// The user's access string, for the commands the gateway answers itself (Valkey
    /// enforces it on everything forwarded).
    #[serde(default)]
    pub access_string: Option<String>,
}

impl fmt::Debug for VerifiedLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedLogin")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("upstream_user", &self.upstream_user)
            .finish_non_exhaustive()
    }
}

/// A refused login (401) or a login that could not be checked (503, e.g. LDAP down).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyRefusal {
    /// `cache-user` or `ldap` (or `none` when no mechanism knows the user).
    pub mechanism: String,
    /// A short machine-readable reason for the audit log (never a secret).
    pub reason: String,
}

/// One data-plane login event a gateway reports (`POST /internal/v1/audit`, in batches).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginEvent {
    /// When the gateway saw it (RFC 3339 UTC).
    pub at: String,
    pub gateway_id: String,
    /// The client's address.
    pub source: String,
    /// The user name as given (`alice@c…`, `default`, a token's `sub`); never a password.
    pub username: String,
    #[serde(default)]
    pub cache_id: Option<CacheId>,
    #[serde(default)]
    pub account_id: Option<AccountId>,
    /// `jwt`, `cache-user`, `ldap`, or `none` when nothing accepted the user name.
    pub mechanism: String,
    /// `success`, `failure` or `lockout`.
    pub outcome: String,
    pub reason: String,
    /// A token's id, when a token was presented.
    #[serde(default)]
    pub jti: Option<String>,
    /// Present when this event stands for many (failed attempts from one source beyond the
    /// few recorded alone); `at` is then the last of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<LoginAggregate>,
}

/// Many login events from one source, counted as one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginAggregate {
    pub count: u64,
    pub first_at: String,
    /// How many had each reason.
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Some of the user names tried.
    pub usernames: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_credentials_round_trip_and_placeholders_are_named() {
        let made = GatewayCredential::generate("edge-1");
        let parsed = GatewayCredential::parse(&format!("{}\n", made.expose())).unwrap();
        assert_eq!(parsed, made);
        assert_eq!(parsed.name(), "edge-1");
        assert!(!format!("{parsed:?}").contains(&made.expose()[12..]), "Debug hides the secret");
        for placeholder in ["change-me", "CHANGEME", "replace-with-a-secret", "sgw_x_change-me"] {
            let err = GatewayCredential::parse(placeholder).unwrap_err();
            assert!(
                matches!(err, CredentialError::Placeholder | CredentialError::Malformed),
                "{placeholder}"
            );
        }
        assert_eq!(GatewayCredential::parse("change-me"), Err(CredentialError::Placeholder));
        assert_eq!(GatewayCredential::parse(" "), Err(CredentialError::Missing));
        assert_eq!(GatewayCredential::parse("sgw_edge-1_0123abcd"), Err(CredentialError::Short));
        let long = format!("{}0", made.expose());
        assert_eq!(GatewayCredential::parse(&long), Err(CredentialError::Malformed));
        let bad_name = made.expose().replacen("edge-1", "Edge_1", 1);
        assert_eq!(GatewayCredential::parse(&bad_name), Err(CredentialError::Malformed));
        assert!(!valid_gateway_name("-x") && !valid_gateway_name("") && valid_gateway_name("gw-2"));
        for local in ["127.0.0.1:8081", "127.9.9.9", "[::1]:1", "::1", "localhost", "LOCALHOST:80"] {
            assert!(is_loopback(local), "{local}");
        }
        for remote in ["0.0.0.0:8081", "10.0.0.1", "[::]:1", "cp.example.internal:8081", "localhost.evil.com"]
        {
            assert!(!is_loopback(remote), "{remote}");
        }
    }

    #[test]
    fn placeholders_are_told_from_secrets() {
        for placeholder in [
            "CHANGE_ME",
            "changeme\n",
            "Change-Me-To-A-Random-Secret",
            "<paste the admin token here>",
            "REPLACE_WITH_THE_CREDENTIAL",
            "${ADMIN_TOKEN}",
            "secret",
            "TODO",
            "xxxxxxxxxxxxxxxx",
            "-----BEGIN PRIVATE KEY-----\nCHANGE_ME\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(is_placeholder(placeholder), "{placeholder:?}");
        }
        let made = GatewayCredential::generate("edge-1");
        for secret in [
            made.expose(),
            "shoal_admin_0123456789abcdef0123456789abcdef0123456789abcdef",
            "3f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a",
            "dGhpcyBpcyBub3QgYSBwbGFjZWhvbGRlcg==",
            "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n",
            "",
        ] {
            assert!(!is_placeholder(secret), "{secret:?}");
        }
        assert_eq!(GatewayCredential::parse("<the credential>"), Err(CredentialError::Placeholder));
    }

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = CacheId::generate();
        assert_eq!(CacheId::parse(id.as_str()).unwrap(), id);
        assert!(CacheId::parse("c123").is_err());
        assert!(CacheId::parse("a0123456789ab").is_err());
        assert!(CacheId::parse("c0123456789aG").is_err());
        assert!(CacheId::parse("c0123456789ab").is_ok());
        assert_eq!(CacheId::parse("c0123456789ab").unwrap().acl_user(), "tc0123456789ab");
    }
}

/// A gateway's demand on one cache's shared limits, posted every
/// few hundred milliseconds (`POST /internal/v1/limits`): what it used and would have used
/// in the last interval, and the limits it applies (from the cache's route).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitDemand {
    pub cache: CacheId,
    /// The cache's ECPU/s limit; `None`: unlimited (no share to hand out).
    pub ecpu_per_second: Option<u64>,
    /// Milli-ECPU per second this gateway's sessions took, plus what they were refused.
    pub ecpu_demand: u64,
    /// Some of its sessions were throttled: it would take more.
    pub ecpu_saturated: bool,
    /// The cache's connection limit; `None`: only the gateway's own bound.
    pub max_connections: Option<u64>,
    pub connections: u64,
    /// Connections refused for want of a share since the last report.
    pub connections_refused: u64,
}

/// The control plane's answer: this gateway's share of each cache's limits until the
/// next report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitShare {
    pub cache: CacheId,
    /// Milli-ECPU per second; `None`: unlimited.
    pub ecpu_milli_per_second: Option<u64>,
    /// Connections this gateway may hold; `None`: no shared limit.
    pub connections: Option<u64>,
    /// Gateways sharing the cache now (an unreachable control plane leaves each gateway
    /// its limit divided by this).
    pub gateways: u32,
}

/// `POST /internal/v1/engine/report`: what an engine agent (`shoal engine`) runs on its host,
/// sent every few seconds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EngineReport {
    /// The agent's host name (`[agent] name`).
    pub host: String,
    pub nodes: Vec<EngineNodeReport>,
}

/// One Valkey node an engine agent runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EngineNodeReport {
    pub name: String,
    /// `host:port`.
    pub addr: String,
    /// The running valkey-server's pid (None while it restarts).
    pub pid: Option<u32>,
    /// How often the agent restarted it.
    pub restarts: u32,
    /// It answered the agent's last health check.
    pub healthy: bool,
}

/// `POST /internal/v1/limits`: one gateway instance's demands, and its failed logins.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitReport {
    pub gateway_id: String,
    pub demands: Vec<LimitDemand>,
    /// None: the gateway does not throttle logins (or predates shared throttling); it is
    /// then answered a bare list of shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logins: Option<throttle::LoginReport>,
}

/// The answer to a [`LimitReport`] that carries `logins` (one without is answered the bare
/// list of shares, as before shared login throttling).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitAnswer {
    pub shares: Vec<LimitShare>,
    /// None only when read from a bare list.
    pub logins: Option<throttle::LoginAnswer>,
}
