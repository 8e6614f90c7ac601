//! LDAP logins: a user name and password checked by binding to a directory,
//! either at a DN built from a template (bind mode) or at the one entry a service account
//! finds (search+bind mode); then the user's groups, mapped to [`Role`]s by configuration.
//!
//! Fails closed: a directory that cannot be reached (or whose certificate does not verify)
//! is [`LdapError::Unavailable`], never a login. The service account's connections are pooled
//! (bounded); a user's bind always gets a fresh connection of its own.

use crate::role::{roles_for_groups, Role, RoleMapping};
use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry, SearchOptions};
use rustls::ClientConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};

/// How to reach the directory and how to turn a user name into a bind.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldaps://host:636` or `ldap://host:389` (then `starttls = true`, unless
    /// `allow_plaintext` says passwords may cross the network in clear).
    pub url: String,
    #[serde(default)]
    pub starttls: bool,
    /// Sending passwords over `ldap://` without StartTLS; only for tests and loopback.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// PEM file with the CA certificate(s) that verify the server; the system's roots if unset.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    pub mode: BindMode,
    #[serde(default)]
    pub groups: GroupLookup,
    /// Group DN → role.
    #[serde(default)]
    pub roles: Vec<RoleMapping>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_operation_timeout_ms")]
    pub operation_timeout_ms: u64,
    /// Most service-account connections open at once.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Most user binds (each on its own connection) in progress at once; more wait, then
    /// fail as unavailable, so a flood of logins cannot open unbounded connections.
    #[serde(default = "default_max_concurrent_logins")]
    pub max_concurrent_logins: usize,
}

fn default_connect_timeout_ms() -> u64 {
    3000
}
fn default_operation_timeout_ms() -> u64 {
    5000
}
fn default_pool_size() -> usize {
    4
}
fn default_max_concurrent_logins() -> usize {
    32
}

/// How a user name becomes the DN to bind as.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum BindMode {
    /// Bind at `dn_template` with `{user}` replaced by the DN-escaped (RFC 4514) user name,
    /// e.g. `uid={user},ou=people,dc=example,dc=org`.
    Bind { dn_template: String },
    /// Bind as the service account, search `base` (subtree) with `filter` (`{user}` replaced
    /// by the filter-escaped (RFC 4515) user name, e.g. `(&(objectClass=person)(uid={user}))`);
    /// exactly one entry must match, and the user binds at its DN.
    Search { bind_dn: String, bind_password: String, base: String, filter: String },
}

impl std::fmt::Debug for BindMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindMode::Bind { dn_template } => {
                f.debug_struct("Bind").field("dn_template", dn_template).finish()
            }
            BindMode::Search { bind_dn, base, filter, .. } => f
                .debug_struct("Search")
                .field("bind_dn", bind_dn)
                .field("bind_password", &"<redacted>")
                .field("base", base)
                .field("filter", filter)
                .finish(),
        }
    }
}

/// Where a user's groups come from.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum GroupLookup {
    /// No groups (no roles).
    None,
    /// The `memberOf` attribute of the user's entry (OpenLDAP's memberof overlay, AD).
    #[default]
    MemberOf,
    /// Groups found under `base` (subtree) by `filter`, with `{dn}` replaced by the user's DN
    /// and `{user}` by the user name, both filter-escaped; e.g.
    /// `(&(objectClass=groupOfNames)(member={dn}))`.
    Search { base: String, filter: String },
}

/// A successful LDAP login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdapIdentity {
    /// The entry the user bound as.
    pub dn: String,
    /// The user name as given.
    pub user: String,
    /// Group DNs as the directory spells them.
    pub groups: Vec<String>,
    /// The roles those groups map to (sorted, no duplicates).
    pub roles: Vec<Role>,
}

/// Why an LDAP login failed. [`LdapError::kind`] is the audit reason and metric label;
/// [`LdapError::client_message`] is what a client may be told.
#[derive(Debug, thiserror::Error)]
pub enum LdapError {
    /// An unauthenticated bind (RFC 4513 §5.1.2) would "succeed"; it is not a login.
    #[error("empty password refused")]
    EmptyPassword,
    #[error("invalid input: {0}")]
    InvalidInput(&'static str),
    #[error("no directory entry matches the user")]
    UnknownUser,
    #[error("{0} directory entries match the user; refusing to pick one")]
    AmbiguousUser(usize),
    /// Wrong password, or (bind mode) no such user: the directory does not say which.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Unreachable, timed out, TLS failure, connection lost: fail closed.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// The directory answered with an error we did not expect (e.g. the service account's
    /// password was refused).
    #[error("directory error: {0}")]
    Directory(String),
    #[error("LDAP configuration: {0}")]
    Config(String),
}

impl LdapError {
    /// A short label for metrics and audit events.
    pub fn kind(&self) -> &'static str {
        match self {
            LdapError::EmptyPassword => "empty_password",
            LdapError::InvalidInput(_) => "invalid_input",
            LdapError::UnknownUser => "unknown_user",
            LdapError::AmbiguousUser(_) => "ambiguous_user",
            LdapError::InvalidCredentials => "invalid_credentials",
            LdapError::Unavailable(_) => "unavailable",
            LdapError::Directory(_) => "directory_error",
            LdapError::Config(_) => "config",
        }
    }

    /// Safe to send to the client: credential failures all read the same, so a client
    /// cannot probe which users exist.
    pub fn client_message(&self) -> &'static str {
        match self {
            LdapError::Unavailable(_) | LdapError::Directory(_) | LdapError::Config(_) => {
                "the login directory is unavailable; try again later"
            }
            _ => "invalid username-password pair or user is disabled",
        }
    }

    /// Whether the user, not the directory, is at fault (counts towards throttling).
    pub fn is_credential_failure(&self) -> bool {
        !matches!(self, LdapError::Unavailable(_) | LdapError::Directory(_) | LdapError::Config(_))
    }
}

/// Escapes a value for an RDN of a DN string (RFC 4514 §2.4).
pub fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:02x}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Escapes a value for an assertion in a search filter (RFC 4515 §3).
pub fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '*' => out.push_str("\\2a"),
            '(' => out.push_str("\\28"),
            ')' => out.push_str("\\29"),
            '\\' => out.push_str("\\5c"),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// Longest user name and password accepted; longer ones are refused before any network I/O.
const MAX_USER: usize = 256;
const MAX_PASSWORD: usize = 1024;

/// An LDAP directory to authenticate against. Cheap to clone; connects lazily, so a process
/// can start while the directory is down.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

struct Inner {
    config: LdapConfig,
    settings: LdapConnSettings,
    connect_timeout: Duration,
    op_timeout: Duration,
    /// Bound service-account connections not in use.
    idle: Mutex<Vec<ldap3::Ldap>>,
    /// One permit per service-account connection that may exist.
    permits: Semaphore,
    /// One permit per user bind in progress.
    logins: Semaphore,
}

/// A service-account connection on loan from the pool.
struct Pooled<'a> {
    ldap: ldap3::Ldap,
    reused: bool,
    inner: &'a Inner,
    _permit: SemaphorePermit<'a>,
}

impl Pooled<'_> {
    /// Back to the idle list (only after an operation that worked).
    fn release(self) {
        self.inner.idle.lock().unwrap().push(self.ldap.clone());
    }
}

impl Directory {
    /// Checks the configuration and loads the CA; does not connect.
    pub fn new(config: LdapConfig) -> Result<Directory, LdapError> {
        let tls = match config.url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()).as_deref() {
            Some("ldaps") => {
                if config.starttls {
                    return Err(LdapError::Config("starttls is for ldap:// URLs, not ldaps://".into()));
                }
                true
            }
            Some("ldap") => {
                if !config.starttls && !config.allow_plaintext {
                    return Err(LdapError::Config(
                        "ldap:// without starttls sends passwords in clear; set starttls = true, \
                         use ldaps://, or set allow_plaintext = true"
                            .into(),
                    ));
                }
                config.starttls
            }
            _ => {
                return Err(LdapError::Config(format!(
                    "url {:?} must start with ldap:// or ldaps://",
                    config.url
                )))
            }
        };
        match &config.mode {
            BindMode::Bind { dn_template } => need_placeholder("dn_template", dn_template, "{user}")?,
            BindMode::Search { filter, .. } => need_placeholder("filter", filter, "{user}")?,
        }
        if let GroupLookup::Search { filter, .. } = &config.groups {
            if !filter.contains("{dn}") && !filter.contains("{user}") {
                return Err(LdapError::Config("groups.filter needs {dn} or {user}".into()));
            }
        }
        if config.pool_size == 0 || config.max_concurrent_logins == 0 {
            return Err(LdapError::Config("pool_size and max_concurrent_logins must be at least 1".into()));
        }
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        let mut settings =
            LdapConnSettings::new().set_conn_timeout(connect_timeout).set_starttls(config.starttls);
        if tls {
            settings = settings.set_config(tls_config(config.ca_cert.as_ref())?);
        }
        Ok(Directory {
            inner: Arc::new(Inner {
                settings,
                connect_timeout,
                op_timeout: Duration::from_millis(config.operation_timeout_ms.max(1)),
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(config.pool_size),
                logins: Semaphore::new(config.max_concurrent_logins),
                config,
            }),
        })
    }

    /// Checks `user`'s password against the directory and returns who they are.
    pub async fn authenticate(&self, user: &str, password: &str) -> Result<LdapIdentity, LdapError> {
        if user.is_empty() {
            return Err(LdapError::InvalidInput("empty user name"));
        }
        if user.len() > MAX_USER {
            return Err(LdapError::InvalidInput("user name too long"));
        }
        if user.chars().any(|c| c.is_control()) {
            return Err(LdapError::InvalidInput("control characters (e.g. NUL) in the user name"));
        }
        // The directory ignores them when matching (` alice` finds `alice`), which would give
        // one person several names in throttling and audit.
        if user.trim() != user {
            return Err(LdapError::InvalidInput("spaces around the user name"));
        }
        if password.is_empty() {
            return Err(LdapError::EmptyPassword);
        }
        if password.len() > MAX_PASSWORD {
            return Err(LdapError::InvalidInput("password too long"));
        }
        if password.contains('\0') {
            return Err(LdapError::InvalidInput("NUL in the password"));
        }
        let inner = &self.inner;
        let (dn, mut attrs) = match &inner.config.mode {
            BindMode::Bind { dn_template } => (dn_template.replace("{user}", &escape_dn_value(user)), None),
            BindMode::Search { base, filter, .. } => {
                let filter = filter.replace("{user}", &escape_filter_value(user));
                let wanted = match inner.config.groups {
                    GroupLookup::MemberOf => vec!["memberOf"],
                    _ => vec!["1.1"],
                };
                let mut entries = inner.service_search(base, Scope::Subtree, &filter, &wanted, 2).await?;
                match entries.len() {
                    0 => return Err(LdapError::UnknownUser),
                    1 => {}
                    n => return Err(LdapError::AmbiguousUser(n)),
                }
                let entry = entries.pop().unwrap();
                (entry.dn, Some(entry.attrs))
            }
        };

        // The user's own connection: a bind changes who a connection is, so it is never
        // one of the service account's.
        let _login = tokio::time::timeout(inner.op_timeout, inner.logins.acquire())
            .await
            .map_err(|_| LdapError::Unavailable("too many LDAP logins in progress".into()))?
            .expect("the semaphore is never closed");
        let mut conn = inner.connect().await?;
        let bound = inner.bind(&mut conn, &dn, password).await;
        let groups = match bound {
            Ok(()) => inner.groups(&mut conn, &dn, user, attrs.take()).await,
            Err(e) => Err(e),
        };
        let _ = tokio::time::timeout(inner.op_timeout, conn.unbind()).await;
        let groups = groups?;
        let roles = roles_for_groups(&inner.config.roles, &groups);
        Ok(LdapIdentity { dn, user: user.to_string(), groups, roles })
    }

    /// Service-account connections open now (idle ones; for metrics and tests).
    pub fn idle_connections(&self) -> usize {
        self.inner.idle.lock().unwrap().len()
    }
}

fn need_placeholder(field: &str, value: &str, placeholder: &str) -> Result<(), LdapError> {
    if value.contains(placeholder) {
        Ok(())
    } else {
        Err(LdapError::Config(format!("{field} {value:?} needs {placeholder}")))
    }
}

fn tls_config(ca_cert: Option<&PathBuf>) -> Result<Arc<ClientConfig>, LdapError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| LdapError::Config(format!("ca_cert {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(LdapError::Config(format!("ca_cert {}: no certificate in it", path.display())));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| LdapError::Config(format!("ca_cert {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(LdapError::Config("no system CA certificates found; set ca_cert".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LdapError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Errors from the connection itself (not an LDAP result code) mean the directory is gone.
fn unavailable(what: &str, e: impl std::fmt::Display) -> LdapError {
    LdapError::Unavailable(format!("{what}: {e}"))
}

impl Inner {
    async fn connect(&self) -> Result<ldap3::Ldap, LdapError> {
        let url = &self.config.url;
        // The connect timeout covers TCP, TLS and StartTLS.
        let connected = tokio::time::timeout(
            self.connect_timeout,
            LdapConnAsync::with_settings(self.settings.clone(), url),
        )
        .await
        .map_err(|_| LdapError::Unavailable(format!("connecting to {url} timed out")))?;
        let (conn, ldap) = connected.map_err(|e| unavailable(&format!("connecting to {url}"), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "LDAP connection ended");
            }
        });
        Ok(ldap)
    }

    /// A simple bind; `InvalidCredentials` for result code 49.
    async fn bind(&self, ldap: &mut ldap3::Ldap, dn: &str, password: &str) -> Result<(), LdapError> {
        let result = tokio::time::timeout(self.op_timeout, ldap.simple_bind(dn, password))
            .await
            .map_err(|_| LdapError::Unavailable("bind timed out".into()))?
            .map_err(|e| unavailable("bind", e))?;
        match result.rc {
            0 => Ok(()),
            49 => Err(LdapError::InvalidCredentials),
            rc => Err(LdapError::Directory(format!("bind as {dn}: result code {rc} {}", result.text))),
        }
    }

    async fn search(
        &self,
        ldap: &mut ldap3::Ldap,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
        size_limit: i32,
    ) -> Result<Vec<SearchEntry>, LdapError> {
        let search = ldap.with_search_options(SearchOptions::new().sizelimit(size_limit)).search(
            base,
            scope,
            filter,
            attrs.to_vec(),
        );
        let result = tokio::time::timeout(self.op_timeout, search)
            .await
            .map_err(|_| LdapError::Unavailable("search timed out".into()))?
            .map_err(|e| unavailable("search", e))?;
        let ldap3::SearchResult(entries, status) = result;
        match status.rc {
            // 4: size limit exceeded; the entries returned say enough (two = ambiguous).
            0 | 4 => {}
            // noSuchObject: the base does not exist, so nothing matches.
            32 => return Ok(Vec::new()),
            rc => {
                return Err(LdapError::Directory(format!(
                    "search {filter}: result code {rc} {}",
                    status.text
                )))
            }
        }
        Ok(entries
            .into_iter()
            .filter(|e| !e.is_ref() && !e.is_intermediate())
            .map(SearchEntry::construct)
            .collect())
    }

    /// A connection from the pool, bound as the service account.
    async fn checkout(&self) -> Result<Pooled<'_>, LdapError> {
        let permit = tokio::time::timeout(self.op_timeout, self.permits.acquire())
            .await
            .map_err(|_| LdapError::Unavailable("every pooled LDAP connection is busy".into()))?
            .expect("the semaphore is never closed");
        loop {
            let idle = self.idle.lock().unwrap().pop();
            match idle {
                Some(mut ldap) => {
                    if !ldap.is_closed() {
                        return Ok(Pooled { ldap, reused: true, inner: self, _permit: permit });
                    }
                }
                None => break,
            }
        }
        let BindMode::Search { bind_dn, bind_password, .. } = &self.config.mode else {
            unreachable!("only search mode uses the service account");
        };
        let mut ldap = self.connect().await?;
        match self.bind(&mut ldap, bind_dn, bind_password).await {
            Ok(()) => Ok(Pooled { ldap, reused: false, inner: self, _permit: permit }),
            Err(LdapError::InvalidCredentials) => Err(LdapError::Directory(
                "the service account's bind was refused (bind_dn/bind_password)".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// A search as the service account. A pooled connection that turns out dead (the directory
    /// restarted) is dropped and the search tried once more on a fresh one.
    async fn service_search(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
        size_limit: i32,
    ) -> Result<Vec<SearchEntry>, LdapError> {
        loop {
            let mut pooled = self.checkout().await?;
            match self.search(&mut pooled.ldap, base, scope, filter, attrs, size_limit).await {
                Ok(entries) => {
                    pooled.release();
                    return Ok(entries);
                }
                Err(LdapError::Unavailable(_)) if pooled.reused => {
                    tracing::debug!("dropping a dead pooled LDAP connection");
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The user's groups; `attrs` are the user's entry's attributes if a search already read them.
    async fn groups(
        &self,
        user_conn: &mut ldap3::Ldap,
        dn: &str,
        user: &str,
        attrs: Option<std::collections::HashMap<String, Vec<String>>>,
    ) -> Result<Vec<String>, LdapError> {
        match &self.config.groups {
            GroupLookup::None => Ok(Vec::new()),
            GroupLookup::MemberOf => {
                let attrs = match attrs {
                    Some(attrs) => attrs,
                    // Bind mode: read the user's own entry as the user.
                    None => {
                        let mut entries = self
                            .search(user_conn, dn, Scope::Base, "(objectClass=*)", &["memberOf"], 1)
                            .await?;
                        entries.pop().map(|e| e.attrs).unwrap_or_default()
                    }
                };
                Ok(attrs
                    .into_iter()
                    .filter(|(name, _)| name.eq_ignore_ascii_case("memberOf"))
                    .flat_map(|(_, values)| values)
                    .collect())
            }
            GroupLookup::Search { base, filter } => {
                let filter = filter
                    .replace("{dn}", &escape_filter_value(dn))
                    .replace("{user}", &escape_filter_value(user));
                let entries = match self.config.mode {
                    BindMode::Search { .. } => {
                        self.service_search(base, Scope::Subtree, &filter, &["1.1"], 0).await?
                    }
                    BindMode::Bind { .. } => {
                        self.search(user_conn, base, Scope::Subtree, &filter, &["1.1"], 0).await?
                    }
                };
                Ok(entries.into_iter().map(|e| e.dn).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn_value("alice"), "alice");
        assert_eq!(escape_dn_value("smith, john"), "smith\\, john");
        assert_eq!(escape_dn_value("a=b+c;d<e>f\"g\\h"), "a\\=b\\+c\\;d\\<e\\>f\\\"g\\\\h");
        assert_eq!(escape_dn_value(" #x "), "\\ #x\\ ");
        assert_eq!(escape_dn_value("#x"), "\\#x");
        assert_eq!(escape_dn_value("a\0b"), "a\\00b");
        assert_eq!(escape_dn_value("admin,ou=admins"), "admin\\,ou\\=admins");
    }

    #[test]
    fn filter_values_are_escaped() {
        assert_eq!(
            escape_filter_value("*)(uid=*))(|(uid=*"),
            "\\2a\\29\\28uid=\\2a\\29\\29\\28|\\28uid=\\2a"
        );
        assert_eq!(escape_filter_value("admin)(|(objectClass=*)"), "admin\\29\\28|\\28objectClass=\\2a\\29");
        assert_eq!(escape_filter_value("a\\b\0"), "a\\5cb\\00");
        assert_eq!(escape_filter_value("jörg"), "jörg");
    }

    fn config(url: &str, starttls: bool) -> LdapConfig {
        LdapConfig {
            url: url.into(),
            starttls,
            allow_plaintext: false,
            ca_cert: None,
            mode: BindMode::Bind { dn_template: "uid={user},dc=x".into() },
            groups: GroupLookup::None,
            roles: Vec::new(),
            connect_timeout_ms: 100,
            operation_timeout_ms: 100,
            pool_size: 1,
            max_concurrent_logins: 1,
        }
    }

    #[test]
    fn unsafe_or_broken_configurations_are_refused() {
        let err = |c: LdapConfig| Directory::new(c).err().expect("refused").to_string();
        assert!(err(config("ldap://h", false)).contains("in clear"));
        assert!(err(config("ldaps://h", true)).contains("starttls"));
        assert!(err(config("http://h", false)).contains("ldap://"));
        let mut c = config("ldaps://h", false);
        c.mode = BindMode::Bind { dn_template: "uid=alice,dc=x".into() };
        assert!(err(c).contains("{user}"));
        let mut c = config("ldaps://h", false);
        c.ca_cert = Some("/nonexistent/ca.pem".into());
        assert!(err(c).contains("ca_cert"));
        let mut c = config("ldap://h", false);
        c.allow_plaintext = true;
        assert!(Directory::new(c).is_ok());
    }

    #[test]
    fn configuration_reads_from_a_file() {
        let config: LdapConfig = serde_json::from_str(
            r#"{
                "url": "ldaps://ldap.example.org",
                "ca_cert": "/etc/shoal/ldap-ca.pem",
                "mode": {"search": {"bind_dn": "cn=svc,dc=example,dc=org", "bind_password": "pw",
                                    "base": "ou=people,dc=example,dc=org", "filter": "(uid={user})"}},
                "groups": {"search": {"base": "ou=groups,dc=example,dc=org",
                                      "filter": "(&(objectClass=groupOfNames)(member={dn}))"}},
                "roles": [{"group": "cn=admins,ou=groups,dc=example,dc=org", "role": "platform-admin"}]
            }"#,
        )
        .unwrap();
        assert!(matches!(config.mode, BindMode::Search { .. }));
        assert_eq!(config.roles[0].role, Role::PlatformAdmin);
        assert_eq!((config.pool_size, config.connect_timeout_ms), (4, 3000));
        let config: LdapConfig = serde_json::from_str(
            r#"{"url": "ldap://h", "starttls": true, "groups": "member-of",
                "mode": {"bind": {"dn_template": "uid={user},ou=people,dc=example,dc=org"}}}"#,
        )
        .unwrap();
        assert!(matches!(config.groups, GroupLookup::MemberOf));
        let typo =
            serde_json::from_str::<LdapConfig>(r#"{"url": "ldap://h", "mode": {"bind": {"dn": "x"}}}"#);
        assert!(typo.is_err());
    }

    #[test]
    fn the_service_password_is_not_printed() {
        let mode = BindMode::Search {
            bind_dn: "cn=svc".into(),
            bind_password: "hunter2".into(),
            base: "dc=x".into(),
            filter: "(uid={user})".into(),
        };
        assert!(!format!("{mode:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_any_connection() {
        // Port 1 on loopback: any attempt to connect would be Unavailable, not these errors.
        let mut c = config("ldap://127.0.0.1:1", false);
        c.allow_plaintext = true;
        let dir = Directory::new(c).unwrap();
        assert!(matches!(dir.authenticate("alice", "").await, Err(LdapError::EmptyPassword)));
        assert!(matches!(dir.authenticate("", "pw").await, Err(LdapError::InvalidInput(_))));
        assert!(matches!(dir.authenticate("al\0ice", "pw").await, Err(LdapError::InvalidInput(_))));
        assert!(matches!(dir.authenticate("alice", "p\0w").await, Err(LdapError::InvalidInput(_))));
        assert!(matches!(dir.authenticate(&"a".repeat(300), "pw").await, Err(LdapError::InvalidInput(_))));
        assert!(matches!(dir.authenticate(" alice", "pw").await, Err(LdapError::InvalidInput(_))));
        assert!(matches!(dir.authenticate("alice ", "pw").await, Err(LdapError::InvalidInput(_))));
        assert!(matches!(dir.authenticate("alice", "pw").await, Err(LdapError::Unavailable(_))));
    }
}
