//! SCRIPT KILL of the cache's own running script.

use super::Ctx;

/// `SCRIPT KILL`: ends the cache's own running script, never another cache's. The gateway
/// knows which caches have scripts in flight on the node ([`crate::scripts`]); only when the
/// asking cache is the only one does it ask the node (as the observer user) to kill.
pub(super) async fn script_kill(cx: &mut Ctx<'_>) {
    let t = cx.tenant();
    let route = t.route.clone();
    match cx.shared().scripts.owner(&route.node_addr, &t.cache) {
        crate::scripts::Owner::Nobody => cx.reply_error("NOTBUSY No scripts in execution right now."),
        crate::scripts::Owner::Another => cx.reply_error(
            "ERR the running script may be another cache's: the platform ends it at the script time limit",
        ),
        crate::scripts::Owner::Asker => match crate::observer::kill_script(&route).await {
            Ok(reply) => cx.reply(reply.freeze()),
            Err(e) => {
                tracing::warn!(error = %e, "SCRIPT KILL on the node failed");
                cx.reply_error("ERR the cache's node did not answer SCRIPT KILL, try again")
            }
        },
    }
}
