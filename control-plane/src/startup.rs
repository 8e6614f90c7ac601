//! Builds the application state and runs the HTTP server (testable on port 0).

use crate::config::ControlPlaneConfig;
use crate::lease::Lease;
use crate::pools::Pools;
use crate::routes;
use crate::signing::Signer;
use crate::state::AppState;
use crate::store::Store;
use actix_web::{web, App, HttpServer};
use std::net::SocketAddr;
use std::sync::Arc;

/// `GET /metrics`: Prometheus metrics, for platform admins only: the series name every cache. (A gateway's
/// own `metrics_listen` serves the gateway's series on a private listener.)
async fn metrics(
    state: web::Data<AppState>,
    who: crate::auth::Principal,
) -> Result<actix_web::HttpResponse, crate::error::ApiError> {
    if !who.is_admin() {
        return Err(crate::error::ApiError::Forbidden);
    }
    let handle = state.metrics.clone();
    let body = web::block(move || handle.render()).await.unwrap_or_default();
    Ok(actix_web::HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(body))
}

/// A running control plane.
pub struct ControlPlane {
    /// The public REST API.
    pub addr: SocketAddr,
    /// The internal API (gateways), and whether it is served over TLS.
    pub internal_addr: SocketAddr,
    pub internal_tls: bool,
    pub handle: actix_web::dev::ServerHandle,
    pub internal_handle: actix_web::dev::ServerHandle,
    /// This process among the control planes ([`crate::lease::instance_id`]).
    pub instance: String,
    /// Where other control planes reach its internal API (`internal_advertise`), if known.
    pub internal_url: Option<String>,
    /// The leases of its background jobs ([`crate::lease`]): the storage sampler
    /// ([`crate::storage::run`]), the sweep of scoped tokens' ACL users
    /// ([`crate::token_users::run`]) and the limits coordinator ([`crate::limits`]); a job
    /// runs while its lease is held here.
    pub leases: Vec<Lease>,
    /// The store, to write pending audit aggregates ([`Store::flush_audit`]) once stopped.
    pub store: Store,
}

impl ControlPlane {
    /// The lease named `name`.
    pub fn lease(&self, name: &str) -> Option<&Lease> {
        self.leases.iter().find(|l| l.name() == name)
    }

    /// Stops the jobs and gives their leases up (another control plane takes them over),
    /// stops both listeners (before the pool is stopped), then writes the audit aggregates
    /// still pending.
    pub async fn stop(&self) {
        for lease in &self.leases {
            lease.stop().await;
        }
        tokio::join!(self.handle.stop(true), self.internal_handle.stop(true));
        let _ = self.store.flush_audit().await;
    }
}

/// The configuration's ranges and combinations, before anything is opened.
fn check(config: &ControlPlaneConfig) -> Result<(), StartupError> {
    if !(0.1..=60.0).contains(&config.storage_interval) {
        return Err(StartupError::Config(format!(
            "storage_interval must be between 0.1 and 60 seconds, not {}",
            config.storage_interval
        )));
    }
    if !(1.0..=3600.0).contains(&config.storage_keyspace_interval) {
        return Err(StartupError::Config(format!(
            "storage_keyspace_interval must be between 1 and 3600 seconds, not {}",
            config.storage_keyspace_interval
        )));
    }
    if !(0.1..=3600.0).contains(&config.acl_sweep_interval) {
        return Err(StartupError::Config(format!(
            "acl_sweep_interval must be between 0.1 and 3600 seconds, not {}",
            config.acl_sweep_interval
        )));
    }
    if !(1..=crate::routes::caches::MAX_DATA_STORAGE_MB).contains(&config.default_data_storage_mb) {
        return Err(StartupError::Config(format!(
            "default_data_storage_mb must be between 1 and {}, not {}",
            crate::routes::caches::MAX_DATA_STORAGE_MB,
            config.default_data_storage_mb
        )));
    }
    config.billing.validate().map_err(|e| StartupError::Config(format!("billing rates: {e}")))?;
    config.check_internal().map_err(StartupError::Config)?;
    if let Some(url) = &config.internal_advertise {
        check_advertise(url).map_err(StartupError::Config)?;
    }
    config.check_secrets().map_err(StartupError::Config)?;
    Ok(())
}

/// Everything [`start`] checks before it opens the store or listens: the settings, the
/// secret files and the internal API's certificate and key (`shoal control-plane
/// --check-config`).
pub fn check_config(config: &ControlPlaneConfig) -> Result<(), String> {
    check(config).map_err(|e| e.to_string())?;
    if let (Some(cert), Some(key)) = (&config.internal_tls_cert, &config.internal_tls_key) {
        tls_config(cert, key)?;
    }
    crate::limits::Forwarder::new(config)?;
    Ok(())
}

/// `internal_advertise`: an http(s) URL of a host and port; plain http to loopback only (the
/// forwarded reports carry gateways' credentials).
fn check_advertise(url: &str) -> Result<(), String> {
    let url = url.replace("{hostname}", &crate::lease::hostname());
    let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || !matches!(scheme, "http" | "https") || rest.trim_end_matches('/') != authority
    {
        return Err(format!(
            "internal_advertise {url:?} must be https://<host>:<port> (or http:// on loopback), nothing after"
        ));
    }
    if scheme == "http" && !shoal_types::is_loopback(authority) {
        return Err(format!(
            "internal_advertise {url} is plain HTTP to a host that is not loopback: the reports other \
             control planes forward there carry gateways' credentials, so use https://"
        ));
    }
    Ok(())
}

/// Where other control planes reach this one's internal API: `internal_advertise`, else the
/// address it listens on unless that is a wildcard.
fn advertised(config: &ControlPlaneConfig, bound: SocketAddr, tls: bool) -> Option<String> {
    if let Some(url) = &config.internal_advertise {
        return Some(url.replace("{hostname}", &crate::lease::hostname()).trim_end_matches('/').to_string());
    }
    let scheme = if tls { "https" } else { "http" };
    (!bound.ip().is_unspecified()).then(|| format!("{scheme}://{bound}"))
}

/// Checks the configuration, opens the store, makes sure the bootstrap admin token exists
/// and builds what every handler reaches. [`start`] serves it; the REST tests drive
/// [`public_app`] with it in-process.
pub async fn state(
    config: ControlPlaneConfig,
    pools: Arc<Pools>,
) -> Result<web::Data<AppState>, StartupError> {
    check(&config)?;
    let key_path = config.audit_key_path();
    let audit_key = crate::store::audit::AuditKey::load_or_create(&key_path)
        .map_err(|e| StartupError::Config(format!("audit_key_path {}: {e}", key_path.display())))?;
    let store = Store::open_audited(&config.database_url, audit_key).await?;
    // Idempotency keys older than 24 h (also purged on every idempotent create).
    store.purge_idempotency_keys(chrono::Utc::now()).await?;
    crate::admin_token::bootstrap(&store, &config.admin_token_path).await?;
    let window =
        std::time::Duration::from_secs(config.token_ttl_max + crate::routes::auth::VERIFY_LEEWAY_SECS);
    let signer = Signer::load_or_create(&store, window).await?;
    let directory = config.ldap.clone().map(shoal_auth::Directory::new).transpose()?;
    let login_throttle = std::sync::Mutex::new(shoal_auth::Throttle::new(config.login_throttle));
    let verify_throttle = std::sync::Mutex::new(shoal_auth::Throttle::new(config.verify_throttle));
    let verify_budget =
        std::sync::Mutex::new(crate::budget::FailureBudget::new(config.verify_failures_per_gateway));
    let limits_forwarder = crate::limits::Forwarder::new(&config).map_err(StartupError::Config)?;
    let snapshots = crate::snapshots::SnapshotStore::open(&config.snapshots).map_err(StartupError::Config)?;
    let state = web::Data::new(AppState {
        snapshots,
        metrics: crate::metrics::handle(config.metrics.as_ref()),
        config,
        store,
        pools,
        signer,
        placement_lock: tokio::sync::Mutex::new(()),
        occupancy: Default::default(),
        users_lock: tokio::sync::Mutex::new(()),
        token_user_changes: Default::default(),
        directory,
        login_throttle,
        verify_throttle,
        verify_budget,
        limits: Default::default(),
        limits_forwarder,
        instance: crate::lease::instance_id(),
    });
    Ok(state)
}

/// Makes a standalone node's tenant ACL users, and its logins' (cache users, scoped tokens),
/// those of the store's caches on it.
async fn restore_tenant_users(
    state: &AppState,
    pool_name: &str,
    pool: &shoal_engine::Pool,
    node: &str,
) -> Result<(), crate::error::ApiError> {
    let (live, gone) = state.store.tenants_on(pool_name, node).await?;
    let gone: Vec<String> = gone.iter().map(|id| id.acl_user()).collect();
    let (made, deleted) = pool.restore_tenant_users(node, &live, &gone).await?;
    let logins = if pool.cluster().is_some() {
        0
    } else {
        crate::domain::logins::restore_login_users(state, pool_name, node).await?
    };
    if logins > 0 {
        tracing::warn!(
            pool = pool_name,
            node,
            logins,
            "login ACL users unsaved at the last stop: restored from the store"
        );
    }
    if made + deleted > 0 {
        tracing::warn!(
            pool = pool_name,
            node,
            made,
            deleted,
            "tenant ACL users unsaved at the last stop: restored from the store"
        );
    }
    Ok(())
}

/// Opens the store, makes sure the bootstrap admin token exists, and starts serving.
pub async fn start(config: ControlPlaneConfig, pools: Arc<Pools>) -> Result<ControlPlane, StartupError> {
    check(&config)?;
    let internal_tls = match (&config.internal_tls_cert, &config.internal_tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key).map_err(StartupError::Config)?),
        _ => None,
    };
    let workers = config.workers;
    let listen = config.listen.clone();
    let internal_listen = config.internal_listen.clone();
    let state = state(config, pools).await?;
    // The nodes' module commands join the command table (gateways fetch them from here).
    for (name, pool) in state.pools.iter() {
        let added = shoal_commands::install_module_commands(&pool.module_commands().await);
        if added > 0 {
            tracing::info!(pool = name, commands = added, "module commands in the command table");
        }
    }
    // Tenant ACL changes are saved in the background (`shoal_engine::acl_save`): those a
    // crash cut short are made again from the store before anything is served.
    for (name, pool) in state.pools.iter() {
        let nodes: Vec<String> = pool.nodes().iter().map(|n| n.name().to_string()).collect();
        for node in nodes {
            if let Err(e) = restore_tenant_users(&state, name, pool, &node).await {
                tracing::warn!(pool = name, node, error = %e, "could not check the node's tenant ACL users");
            }
        }
    }
    // Keyspace-notification settings live in memory on the nodes: set them again.
    for (name, pool) in state.pools.iter() {
        let targets: Vec<String> = pool.loads().into_iter().map(|l| l.node).collect();
        for node in targets {
            if let Err(e) = crate::domain::caches::apply_keyspace_events(&state, name, &node).await {
                tracing::warn!(pool = name, node, error = %e, "could not restore keyspace notifications");
            }
        }
    }
    let store = state.store.clone();
    let sampler_state = state.clone().into_inner();
    let internal_state = state.clone();
    let internal = HttpServer::new(move || {
        App::new()
            .app_data(internal_state.clone())
            .app_data(json_config())
            .app_data(web::PathConfig::default().error_handler(crate::error::path_error))
            .wrap(actix_web::middleware::from_fn(internal_access_log))
            .configure(routes::internal::configure)
            .configure(routes::usage::configure_internal)
            .default_service(web::to(not_found))
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(5);
    let tls_on = internal_tls.is_some();
    let internal = match internal_tls {
        Some(tls) => internal.bind_rustls_0_23(&internal_listen, tls)?,
        None => internal.bind(&internal_listen)?,
    };
    let server = HttpServer::new(move || public_app(state.clone()))
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(5)
        .bind(&listen)?;
    // Both bound: the background jobs, each under its lease; then the servers.
    let (addr, internal_addr) = (server.addrs()[0], internal.addrs()[0]);
    let internal_url = advertised(&sampler_state.config, internal_addr, tls_on);
    let instance = sampler_state.instance.clone();
    tracing::info!(
        instance,
        internal_url = internal_url.as_deref().unwrap_or("none"),
        "control plane instance"
    );
    if internal_url.is_none() && store.backend == crate::store::Backend::Postgres {
        tracing::warn!(
            internal_listen = %internal_addr,
            "internal_listen is a wildcard address and internal_advertise is not set: while this control \
             plane coordinates the limits, the others cannot forward gateways' reports to it"
        );
    }
    let leases = start_leases(&sampler_state, &instance, internal_url.clone()).await;
    let (server, internal) = (server.run(), internal.run());
    let (handle, internal_handle) = (server.handle(), internal.handle());
    tokio::spawn(server);
    tokio::spawn(internal);
    Ok(ControlPlane {
        addr,
        internal_addr,
        internal_tls: tls_on,
        handle,
        internal_handle,
        instance,
        internal_url,
        leases,
        store,
    })
}

/// The background jobs, each under its lease ([`crate::lease`]): on PostgreSQL, one control
/// plane runs each at a time.
async fn start_leases(state: &Arc<AppState>, instance: &str, internal_url: Option<String>) -> Vec<Lease> {
    let store = state.store.clone();
    let interval = std::time::Duration::from_secs_f64(state.config.storage_interval);
    let sweep_interval = std::time::Duration::from_secs_f64(state.config.acl_sweep_interval);
    let schedule_interval = std::time::Duration::from_secs_f64(state.config.snapshots.schedule_interval);
    let (s1, s2, s3, s4) = (state.clone(), state.clone(), state.clone(), state.clone());
    vec![
        Lease::run(store.clone(), crate::lease::SNAPSHOT_SCHEDULE, instance, None, move |_| {
            Box::pin(crate::snapshots::schedule::run(s4.clone(), schedule_interval))
        })
        .await,
        Lease::run(store.clone(), crate::lease::STORAGE_SAMPLER, instance, None, move |_| {
            Box::pin(crate::storage::run(s1.clone(), interval))
        })
        .await,
        Lease::run(store.clone(), crate::lease::ACL_SWEEP, instance, None, move |_| {
            Box::pin(crate::token_users::run(s2.clone(), sweep_interval))
        })
        .await,
        // Only while gateways ask this control plane directly: the coordinator goes where
        // the reports arrive.
        Lease::run_while(
            store,
            crate::lease::LIMITS,
            instance,
            internal_url,
            {
                let state = s3.clone();
                move || state.limits.asked_recently()
            },
            s3.limits.wake(),
            move |acquired| {
                let state = s3.clone();
                Box::pin(async move { state.limits.serve(acquired).await })
            },
        )
        .await,
    ]
}

/// The public REST API: every route, the extractors' error answers, request ids and the
/// access log. One per worker in [`start`]; the REST tests call it with
/// `actix_web::test::init_service`.
pub fn public_app(
    state: web::Data<AppState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .app_data(json_config())
        .app_data(web::PathConfig::default().error_handler(crate::error::path_error))
        .app_data(web::QueryConfig::default().error_handler(crate::error::query_error))
        .wrap(actix_web::middleware::from_fn(crate::context::middleware))
        .wrap(logger())
        .configure(routes::health::configure)
        .configure(routes::internal::configure_public)
        .configure(routes::gateways::configure)
        .configure(routes::pools::configure)
        .configure(routes::accounts::configure)
        .configure(routes::caches::configure)
        .configure(routes::snapshots::configure)
        .configure(routes::audit::configure)
        .configure(routes::tokens::configure)
        .configure(routes::me::configure)
        .configure(routes::portal::configure)
        .configure(routes::users::configure)
        .configure(routes::auth::configure)
        .configure(routes::sessions::configure)
        .configure(routes::usage::configure)
        .configure(routes::billing::configure)
        .route("/openapi.json", web::get().to(openapi_json))
        .route("/metrics", web::get().to(metrics))
        .service(
            // The interactive viewer, served from files compiled in (no CDN).
            utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}")
                .url("/docs/openapi.json", crate::apidoc::openapi()),
        )
        .route("/docs", web::get().to(docs_redirect))
        .default_service(web::to(not_found))
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(64 * 1024)
        .content_type_required(false)
        .error_handler(crate::error::json_error)
}

fn logger() -> actix_web::middleware::Logger {
    actix_web::middleware::Logger::new("%a \"%r\" %s %Dms request_id=%{x-request-id}o")
        .log_target("shoal::http")
}

/// The internal API's access log. Gateways and engine agents poll it several times a second
/// (limit shares, revocations, keys, usage, reports): a request that succeeds is logged at
/// debug only, so the terminal keeps the events a developer wants to see; a refused or
/// failed one at warn.
async fn internal_access_log(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let began = std::time::Instant::now();
    let peer = req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let request = format!("{} {}", req.method(), req.path());
    let res = next.call(req).await?;
    let status = res.status().as_u16();
    let ms = began.elapsed().as_secs_f64() * 1000.0;
    if status >= 400 {
        tracing::warn!(target: "shoal::http", "{peer} \"{request}\" {status} {ms:.3}ms (internal API)");
    } else {
        tracing::debug!(target: "shoal::http", "{peer} \"{request}\" {status} {ms:.3}ms (internal API)");
    }
    Ok(res)
}

/// The internal listener's TLS configuration from PEM files.
fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read =
        |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()));
    let certs = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("internal_tls_cert {}: {e}", cert.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("internal_tls_key {}: {e}", key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|e| format!("internal TLS certificate and key: {e}"))
}

async fn openapi_json() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok().content_type("application/json").body(crate::apidoc::document())
}

async fn docs_redirect() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Found().insert_header(("Location", "/docs/")).finish()
}

async fn not_found() -> Result<actix_web::HttpResponse, crate::error::ApiError> {
    Err(crate::error::ApiError::NotFound("route"))
}

/// Anything that stops the control plane from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Ldap(#[from] shoal_auth::LdapError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("admin token: {0}")]
    AdminToken(#[from] crate::admin_token::AdminTokenError),
}
