//! Virtualized commands: what the gateway answers or rewrites so that a cache behaves like a
//! whole Valkey of its own — its own databases numbered from 0, its own channels, its own
//! clients and stats, a one-node "cluster" at the gateway's address — without seeing
//! anything of other caches.

mod client;
mod cluster;
mod connection;
mod ctx;
mod keyspace;
mod pubsub;
mod scripting;
mod server;
mod tracking;

use crate::resp::value::Value;
use crate::session::{Session, NOAUTH};
use bytes::Bytes;
use ctx::Ctx;
use shoal_commands::CommandSpec;
use std::ops::Range;
use std::sync::atomic::Ordering;

const OK: &[u8] = b"+OK\r\n";

/// Runs a virtualized command (`spec.treatment` is `Virtual`).
pub(crate) async fn run(s: &mut Session, spec: &CommandSpec, args: &[Range<usize>]) {
    let name = spec.name.as_str();
    let owned: Vec<Vec<u8>> = (0..args.len()).map(|i| s.arg(args, i).to_vec()).collect();
    let argv: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
    if s.in_multi && !spec.shoal.multi_ok {
        let shown = spec.display_name();
        return s.refuse(&format!("ERR {shown} is not supported inside MULTI on Shoal caches"));
    }
    // What runs before login too (and changes it): on the session itself.
    match name {
        "auth" => return connection::auth(s, &argv).await,
        "hello" => return connection::hello(s, &argv).await,
        "quit" => {
            s.reply(Bytes::from_static(OK));
            return s.close_after_replies();
        }
        "reset" => return connection::reset(s).await,
        _ => {}
    }
    // The gateway refuses everything else before login (`decide::reject`).
    let Some(mut cx) = Ctx::new(s) else { return s.refuse(NOAUTH) };
    logged_in(&mut cx, name, &argv).await
}

/// The virtualized commands of a logged-in session.
async fn logged_in(cx: &mut Ctx<'_>, name: &str, argv: &[&[u8]]) {
    match name {
        "script|kill" => scripting::script_kill(cx).await,
        "select" => connection::select(cx, argv).await,
        "flushall" => keyspace::flushall(cx, argv).await,
        "move" => keyspace::move_key(cx, argv).await,
        "copy" => keyspace::copy(cx, argv).await,
        "info" => server::info(cx, argv).await,
        "config|get" => server::config_get(cx, argv),
        "role" => server::role(cx),
        "readonly" | "readwrite" => cx.reply(Bytes::from_static(OK)),
        "acl|whoami" => cx.reply_value(&Value::bulk("default")),
        "client|list" => client::list(cx),
        "client|info" => client::info(cx).await,
        "client|id" => {
            let id = cx.tenant().entry.id.load(Ordering::Relaxed);
            cx.reply_value(&Value::Int(id))
        }
        "client|setname" | "client|setinfo" => client::set(cx, name, argv).await,
        "client|kill" => client::kill(cx, argv),
        "client|reply" => client::reply(cx, argv),
        "client|no-evict" => cx.reply(Bytes::from_static(OK)),
        "client|tracking" => tracking::client_tracking(cx, argv).await,
        "client|caching" => tracking::client_caching(cx, argv),
        "client|getredir" => tracking::client_getredir(cx),
        "client|trackinginfo" => tracking::client_trackinginfo(cx),
        n if n.starts_with("cluster|") => cluster::cluster(cx, n, argv),
        n if n == "command" || n.starts_with("command|") => server::command(cx, n, argv).await,
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe" | "sunsubscribe" => {
            pubsub::subscribe(cx, name, argv).await
        }
        "publish" | "spublish" => pubsub::publish(cx, argv).await,
        n if n.starts_with("pubsub|") => pubsub::pubsub(cx, n, argv).await,
        _ => cx.refuse(&format!("ERR unknown command '{name}'")),
    }
}

fn wrong_args(cx: &mut Ctx<'_>, name: &str) {
    cx.refuse(&format!("ERR wrong number of arguments for '{name}' command"));
}
