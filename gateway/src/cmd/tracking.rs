//! Client-side caching: CLIENT TRACKING, CACHING, GETREDIR, TRACKINGINFO, built by the gateway.

use super::Ctx;
use super::{wrong_args, OK};
use crate::resp::value::Value;
use bytes::Bytes;
use std::sync::atomic::Ordering;

/// `CLIENT TRACKING ON|OFF [REDIRECT id] [PREFIX p …] [BCAST] [OPTIN] [OPTOUT] [NOLOOP]`.
pub(super) async fn client_tracking(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    if argv.len() < 3 {
        return wrong_args(cx, "client|tracking");
    }
    let on = if argv[2].eq_ignore_ascii_case(b"ON") {
        true
    } else if argv[2].eq_ignore_ascii_case(b"OFF") {
        false
    } else {
        return cx.refuse("ERR syntax error");
    };
    let t = cx.tenant();
    if !on {
        *t.entry.tracking.lock().unwrap() = None;
        cx.set_tracking(false);
        return cx.reply(Bytes::from_static(OK));
    }
    let mut tracking = crate::clients::Tracking::default();
    let mut i = 3;
    while i < argv.len() {
        let opt = argv[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"BCAST" => tracking.bcast = true,
            b"OPTIN" => tracking.optin = true,
            b"OPTOUT" => tracking.optout = true,
            b"NOLOOP" => tracking.noloop = true,
            b"PREFIX" if i + 1 < argv.len() => {
                tracking.prefixes.push(argv[i + 1].to_vec());
                i += 1;
            }
            b"REDIRECT" if i + 1 < argv.len() => {
                let id: Option<i64> = std::str::from_utf8(argv[i + 1]).ok().and_then(|v| v.parse().ok());
                let target = id.and_then(|id| {
                    cx.shared()
                        .clients
                        .list(&t.cache)
                        .into_iter()
                        .find(|c| c.id.load(Ordering::Relaxed) == id)
                });
                match target {
                    Some(c) if c.key != t.entry.key => tracking.redirect = Some(c.key),
                    Some(_) => {}
                    None => return cx.refuse("ERR The client ID you want redirect to does not exist"),
                }
                i += 1;
            }
            _ => return cx.refuse("ERR syntax error"),
        }
        i += 1;
    }
    if !tracking.prefixes.is_empty() && !tracking.bcast {
        return cx.refuse("ERR PREFIX option requires BCAST mode to be enabled");
    }
    if tracking.optin && tracking.optout {
        return cx.refuse("ERR You can't use both OPTIN and OPTOUT");
    }
    if tracking.bcast && (tracking.optin || tracking.optout) {
        return cx.refuse("ERR OPTIN and OPTOUT are not compatible with BCAST");
    }
    let route = t.route.clone();
    let shared = cx.shared().clone();
    if let Err(e) = shared.tracker.watch(&shared.control_plane, &shared.clients, &route).await {
        tracing::warn!(error = %e, "client tracking unavailable");
        return cx.reply_error("ERR client tracking is unavailable right now, try again");
    }
    let t = cx.tenant();
    *t.entry.tracking.lock().unwrap() = Some(tracking);
    cx.set_tracking(true);
    cx.reply(Bytes::from_static(OK));
}

/// `CLIENT CACHING YES|NO`: whether the next command's keys are tracked (OPTIN/OPTOUT).
pub(super) fn client_caching(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    if argv.len() != 3 {
        return wrong_args(cx, "client|caching");
    }
    let t = cx.tenant();
    let mut tracking = t.entry.tracking.lock().unwrap();
    let answer = match tracking.as_mut() {
        Some(tr) if tr.optin || tr.optout => {
            if argv[2].eq_ignore_ascii_case(b"YES") && tr.optin {
                tr.caching = Some(true);
                Ok(())
            } else if argv[2].eq_ignore_ascii_case(b"NO") && tr.optout {
                tr.caching = Some(false);
                Ok(())
            } else if argv[2].eq_ignore_ascii_case(b"YES") || argv[2].eq_ignore_ascii_case(b"NO") {
                Err("ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.")
            } else {
                Err("ERR syntax error")
            }
        }
        _ => Err("ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled"),
    };
    drop(tracking);
    match answer {
        Ok(()) => cx.reply(Bytes::from_static(OK)),
        Err(e) => cx.refuse(e),
    }
}

pub(super) fn client_getredir(cx: &mut Ctx<'_>) {
    let t = cx.tenant();
    let redirect = t.entry.tracking.lock().unwrap().as_ref().map(|tr| tr.redirect);
    let id = match redirect {
        None => -1,
        Some(None) => 0,
        Some(Some(key)) => cx
            .shared()
            .clients
            .list(&t.cache)
            .iter()
            .find(|c| c.key == key)
            .map_or(-1, |c| c.id.load(Ordering::Relaxed)),
    };
    cx.reply_value(&Value::Int(id));
}

pub(super) fn client_trackinginfo(cx: &mut Ctx<'_>) {
    let t = cx.tenant();
    let tracking = t.entry.tracking.lock().unwrap();
    let (flags, prefixes) = match tracking.as_ref() {
        None => (vec![Value::bulk("off")], vec![]),
        Some(tr) => {
            let mut flags = vec![Value::bulk("on")];
            for (set, name) in
                [(tr.bcast, "bcast"), (tr.optin, "optin"), (tr.optout, "optout"), (tr.noloop, "noloop")]
            {
                if set {
                    flags.push(Value::bulk(name));
                }
            }
            (flags, tr.prefixes.iter().map(Value::bulk).collect())
        }
    };
    let redirect = tracking.as_ref().map_or(-1, |tr| if tr.redirect.is_some() { 1 } else { 0 });
    drop(tracking);
    cx.reply_value(&Value::Map(vec![
        (Value::bulk("flags"), Value::Set(flags)),
        (Value::bulk("redirect"), Value::Int(redirect)),
        (Value::bulk("prefixes"), Value::Array(prefixes)),
    ]));
}
