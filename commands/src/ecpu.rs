//! The ECPU rule's arithmetic (see the gateway's `metering::ecpu` for the rule): here, so
//! that the gateway and the control plane (which meters what it writes into a cache, such
//! as an import) bill alike.

/// Milli-ECPU for moving `bytes` (1 ECPU per KiB, rounded down to the milli-ECPU).
#[inline]
pub fn transfer_milli(bytes: u64) -> u64 {
    bytes * 1000 / 1024
}

/// Bytes a free command (`weight == 0`) may move for free: past this, it is billed by
/// transfer like any command, so a `PING <512 MB>` is neither free nor unlimited.
pub const FREE_BYTES: u64 = 1024;

/// The rule: milli-ECPU of one command. `weight == 0` means free, up to [`FREE_BYTES`].
#[inline]
pub fn ecpu_milli(weight: u32, per_element: u32, elements: u64, request: u64, reply: u64) -> u64 {
    if weight == 0 {
        return if request + reply > FREE_BYTES { transfer_milli(request + reply) } else { 0 };
    }
    let work = weight as u64 + per_element as u64 * elements;
    work.max(transfer_milli(request + reply))
}
