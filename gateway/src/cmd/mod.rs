//! Virtualized commands: what the gateway answers or rewrites so that a cache behaves like a
//! whole Valkey of its own — its own databases numbered from 0, its own channels, its own
//! clients and stats, a one-node "cluster" at the gateway's address — without seeing
//! anything of other caches.

mod client;
mod cluster;
mod connection;
mod keyspace;
mod pubsub;
mod scripting;
mod server;
mod tracking;

use crate::pubsub::Namespace;
use crate::resp::value::Value;
use crate::session::Session;
use bytes::Bytes;
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
    match name {
        "auth" => connection::auth(s, &argv).await,
        "hello" => connection::hello(s, &argv).await,
        "quit" => {
            s.reply(Bytes::from_static(OK));
            s.close_after_replies();
        }
        "reset" => connection::reset(s).await,
        "script|kill" => scripting::script_kill(s).await,
        "select" => connection::select(s, &argv).await,
        "flushall" => keyspace::flushall(s, &argv).await,
        "move" => keyspace::move_key(s, &argv).await,
        "copy" => keyspace::copy(s, &argv).await,
        "info" => server::info(s, &argv).await,
        "readonly" | "readwrite" => s.reply(Bytes::from_static(OK)),
        "acl|whoami" => s.reply_value(&Value::bulk("default")),
        "client|list" => client::list(s),
        "client|info" => client::info(s).await,
        "client|id" => {
            let id = s.tenant.as_ref().expect("after AUTH").entry.id.load(Ordering::Relaxed);
            s.reply_value(&Value::Int(id))
        }
        "client|setname" | "client|setinfo" => client::set(s, name, &argv).await,
        "client|kill" => client::kill(s, &argv),
        "client|no-evict" => s.reply(Bytes::from_static(OK)),
        "client|tracking" => tracking::client_tracking(s, &argv).await,
        "client|caching" => tracking::client_caching(s, &argv),
        "client|getredir" => tracking::client_getredir(s),
        "client|trackinginfo" => tracking::client_trackinginfo(s),
        n if n.starts_with("cluster|") => cluster::cluster(s, n, &argv),
        n if n == "command" || n.starts_with("command|") => server::command(s, n, &argv).await,
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe" | "sunsubscribe" => {
            pubsub::subscribe(s, name, &argv).await
        }
        "publish" | "spublish" => pubsub::publish(s, &argv).await,
        n if n.starts_with("pubsub|") => pubsub::pubsub(s, n, &argv).await,
        _ => s.refuse(&format!("ERR unknown command '{name}'")),
    }
}

fn wrong_args(s: &mut Session, name: &str) {
    s.refuse(&format!("ERR wrong number of arguments for '{name}' command"));
}

fn ns(s: &Session) -> Namespace {
    s.tenant.as_ref().map(|t| t.ns.clone()).expect("virtualized commands run after AUTH")
}
