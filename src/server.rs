//! Wiring: logging, limits, the engine, the router, serving until a signal, and the drain.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::CorsLayer;
use tower_http::timeout::TimeoutLayer;

use crate::addr_limits::SocketLimits;
use crate::config::Config;
use crate::engine::memory::MemoryEngine;
use crate::engine::redis::{RedisEngine, RedisSettings};
use crate::engine::Engine;
use crate::health::Health;
use crate::http::{self, App};
use crate::http_conn::{self, Timeouts};
use crate::listener::LimitedListener;
use crate::shutdown::{self, Phase};
use crate::ws;
use crate::{mailbox, sessions};

/// Descriptors kept free below the soft limit for Redis, logs and the runtime itself.
const FD_RESERVE: u64 = 32;
/// TCP connections allowed beyond the WebSocket cap: room for `/health`, `/ready` and ordinary
/// HTTP requests while every WebSocket slot is taken.
const HTTP_HEADROOM: usize = 32;

/// The process entry point: returns the exit code.
pub fn main(config: Config) -> ExitCode {
    // Descriptors first, while this is the only thread (the log writer starts one).
    let (fd_limit, not_raised) = crate::descriptors::raise_limit();
    let most = config.max_connections as u64 + HTTP_HEADROOM as u64 + FD_RESERVE;
    let presized = crate::descriptors::presize_table(most, fd_limit);
    let (dropped, _log_guard) = crate::logging::init(config.log_format);
    if let Some(e) = not_raised {
        tracing::warn!(error = %e, "cannot raise the file descriptor limit");
    }
    if let Err(e) = presized {
        tracing::warn!(error = %e, "cannot size the descriptor table up front");
    }
    crate::metrics::install(if config.redis_url.is_some() {
        "redis"
    } else {
        "memory"
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, fd_limit, dropped)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "beach-road stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    config: Config,
    fd_limit: u64,
    dropped: crate::logging::Dropped,
) -> std::io::Result<()> {
    let secret = config
        .load_secret()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let admin = crate::admin::Admin::from_config(&config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
        .map(Arc::new);
    let addr = SocketAddr::new(config.bind, config.port);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let max_tcp = fd_limit.saturating_sub(FD_RESERVE).max(2) as usize;
    let max_sockets = config
        .max_connections
        .min(max_tcp.saturating_sub(HTTP_HEADROOM))
        .max(1);
    tracing::info!(addr = %listener.local_addr()?, max_sockets, "listening");
    match config.redis_url.clone() {
        None => {
            let engine = MemoryEngine::start(config.engine());
            serve(
                engine,
                "memory",
                config,
                secret,
                admin,
                listener,
                max_sockets,
                dropped,
            )
            .await
        }
        Some(url) => {
            let settings = RedisSettings {
                url,
                key_prefix: config.key_prefix.clone(),
                heartbeat_interval: config.heartbeat_interval,
                instance_timeout: config.instance_timeout,
            };
            let engine = RedisEngine::start(config.engine(), settings)
                .await
                .map_err(|e| {
                    let msg = format!("invalid REDIS_URL: {e}");
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
                })?;
            serve(
                engine,
                "redis",
                config,
                secret,
                admin,
                listener,
                max_sockets,
                dropped,
            )
            .await
        }
    }
}

/// The routes of protocol.md §3 and §4.
pub fn router<E: Engine>(app: App<E>) -> Router {
    let body_limit = app.config.max_message_bytes;
    let request_timeout = app.config.request_timeout;
    Router::new()
        .route("/health", get(http::health::<E>))
        .route("/ready", get(http::ready::<E>))
        .route("/metrics", get(http::metrics::<E>))
        .route("/sessions", post(sessions::register::<E>))
        .route("/sessions/{id}", get(sessions::session_status::<E>))
        .route("/sessions/{id}/join", post(sessions::join::<E>))
        .route("/peer-sessions/attach", post(sessions::attach::<E>))
        .route(
            "/sessions/{id}/webrtc/offer",
            post(mailbox::post_sdp::<E>).get(mailbox::get_offer::<E>),
        )
        .route(
            "/sessions/{id}/webrtc/answer",
            post(mailbox::post_sdp::<E>).get(mailbox::get_answer::<E>),
        )
        .route(
            "/peer-sessions/{id}/webrtc/offer",
            post(mailbox::post_sdp::<E>).get(mailbox::get_offer::<E>),
        )
        .route(
            "/peer-sessions/{id}/webrtc/answer",
            post(mailbox::post_sdp::<E>).get(mailbox::get_answer::<E>),
        )
        .route("/ws/{id}", get(ws::upgrade::<E>))
        // The relay base URL (`{base}/relay/`): the session routes again, registering relay
        // sessions, and the relay sockets.
        .route("/relay/sessions", post(sessions::register_relay::<E>))
        .route("/relay/sessions/{id}", get(sessions::session_status::<E>))
        .route("/relay/sessions/{id}/join", post(sessions::join::<E>))
        .merge(crate::admin::routes::<E>(app.admin.is_some()))
        .layer(axum::middleware::from_fn(http::request_span))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(CorsLayer::permissive())
        // A host's relay upgrade is held for `--relay-hold`, longer than any other request
        // may take: outside the request timeout, bounded by its own hold.
        .route("/relay/{token}", get(crate::relay::socket::upgrade::<E>))
        .with_state(app)
}

#[allow(clippy::too_many_arguments)] // the wiring's inputs, each built once in `run`
async fn serve<E: Engine>(
    engine: E,
    engine_name: &'static str,
    config: Config,
    secret: crate::code::Secret,
    admin: Option<Arc<crate::admin::Admin>>,
    listener: tokio::net::TcpListener,
    max_sockets: usize,
    dropped: crate::logging::Dropped,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    let (drain, shutdown) = shutdown::channel();
    let health = Health::new(engine_name, config.max_lag, move || dropped.count());
    let sockets = Arc::new(tokio::sync::Semaphore::new(max_sockets));
    let app = App {
        engine: engine.clone(),
        config: config.clone(),
        shutdown: shutdown.clone(),
        health: health.clone(),
        secret,
        sockets: sockets.clone(),
        per_address: Arc::new(SocketLimits::new(
            config.max_sockets_per_address,
            config.upgrades_per_address,
        )),
        admin,
    };
    let watchdog = tokio::spawn(health.watchdog());
    let upkeep = tokio::spawn(crate::metrics::upkeep());
    let janitor = tokio::spawn(crate::relay::janitor(engine.clone()));

    let max_tcp = max_sockets + HTTP_HEADROOM;
    let listener = LimitedListener::new(
        listener,
        max_tcp,
        config.max_connections_per_address,
        config.trusted_proxies.clone(),
    );
    let timeouts = Timeouts {
        header_read: config.header_read_timeout,
        idle: config.http_idle_timeout,
        proxy_idle: config.proxy_idle_timeout,
    };
    let mut server = tokio::spawn(http_conn::serve(
        listener,
        router(app),
        timeouts,
        config.trusted_proxies.clone(),
        shutdown.clone(),
    ));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    tokio::select! {
        _ = shutdown::signal() => {}
        result = &mut server => {
            watchdog.abort();
            upkeep.abort();
            janitor.abort();
            let why = result.err().map(|e| e.to_string());
            let why = why.unwrap_or_else(|| "stopped accepting".into());
            return Err(std::io::Error::other(format!("the HTTP server ended: {why}")));
        }
    }
    tracing::info!(delay = ?config.drain_delay, "draining: /ready fails from now on");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    drain.set(Phase::Draining);
    tokio::select! {
        _ = tokio::time::sleep(config.drain_delay) => {}
        _ = shutdown::signal() => tracing::info!("second signal: skipping the drain delay"),
    }
    drain.set(Phase::Closing);

    // Sockets leave at once and close within the jitter window; wait for them, bounded.
    let bound = config.drain_jitter + config.write_timeout.min(Duration::from_secs(5));
    let all_closed = async {
        let _ = sockets.acquire_many(max_sockets as u32).await;
    };
    if tokio::time::timeout(bound, all_closed).await.is_err() {
        tracing::warn!("sockets still open at the end of the drain");
    }
    engine.shutdown().await;
    // HTTP connections close after their current request; any still open are dropped here.
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }
    watchdog.abort();
    upkeep.abort();
    janitor.abort();
    tracing::info!("stopped");
    Ok(())
}
