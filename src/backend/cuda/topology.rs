//! Which GPUs can reach each other: the driver's answer (`cuDeviceCanAccessPeer` both ways:
//! the P2P kernels are only used when it says yes for every pair) and NVML's view (NVLink
//! links up, P2P read status; devices matched by PCI bus id), logged beside it when a group
//! spans GPUs. The selection chain (`crate::comm::select`) takes the result as a [`Topology`].

use super::allreduce::can_access_peer;
use crate::comm::select::Topology;
use crate::error::Result;
use nvml_wrapper::enum_wrappers::device::{P2pCapabilitiesIndex, P2pStatus};

/// What NVML reports for a pair of devices (None where NVML is unavailable).
#[derive(Debug, Clone, PartialEq)]
pub struct PairInfo {
    pub a: usize,
    pub b: usize,
    /// The driver's probe: a can map b's memory.
    pub driver_p2p: bool,
    pub nvml_p2p_read: Option<String>,
    pub nvml_nvlink: Option<String>,
}

/// Per device: (ordinal, NVLink links up; None where NVML is unavailable).
pub type LinksUp = Vec<(usize, Option<u32>)>;

/// NVML's handle for CUDA device `ordinal`, matched by PCI bus id (NVML's indices follow
/// the PCI order, CUDA's may not, and CUDA_VISIBLE_DEVICES renumbers only CUDA's).
fn nvml_device(nvml: &nvml_wrapper::Nvml, ordinal: usize) -> Option<nvml_wrapper::Device<'_>> {
    let mut buf = [0 as std::ffi::c_char; 64];
    // SAFETY: the driver writes a NUL-terminated id of at most `len` bytes into `buf`.
    unsafe {
        cudarc::driver::sys::cuDeviceGetPCIBusId(
            buf.as_mut_ptr(),
            buf.len() as i32,
            ordinal as i32,
        )
        .result()
        .ok()?;
    }
    // SAFETY: NUL-terminated by the driver (the buffer is zeroed and longer than any id).
    let id = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .ok()?;
    nvml.device_by_pci_bus_id(id).ok()
}

/// NVLink links up per device, and the pairwise P2P status among `devices`.
pub fn survey(devices: &[usize]) -> Result<(LinksUp, Vec<PairInfo>)> {
    let nvml = nvml_wrapper::Nvml::init().ok();
    let dev = |i: usize| nvml.as_ref().and_then(|n| nvml_device(n, i));
    let links = devices
        .iter()
        .map(|&i| {
            let up = dev(i).map(|d| {
                (0..18u32)
                    .filter(|l| d.link_wrapper_for(*l).is_active().unwrap_or(false))
                    .count() as u32
            });
            (i, up)
        })
        .collect();
    let mut pairs = Vec::new();
    for (x, &a) in devices.iter().enumerate() {
        for &b in &devices[x + 1..] {
            let status = |idx: P2pCapabilitiesIndex| -> Option<String> {
                let (da, db) = (dev(a)?, dev(b)?);
                Some(match da.p2p_status(&db, idx) {
                    Ok(P2pStatus::Ok) => "ok".to_string(),
                    Ok(s) => format!("{s:?}"),
                    Err(e) => format!("error: {e}"),
                })
            };
            pairs.push(PairInfo {
                a,
                b,
                driver_p2p: can_access_peer(a, b)? && can_access_peer(b, a)?,
                nvml_p2p_read: status(P2pCapabilitiesIndex::Read),
                nvml_nvlink: status(P2pCapabilitiesIndex::NvLink),
            });
        }
    }
    Ok((links, pairs))
}

/// The devices ranks placed on `rank_devices` use, each once, in order.
pub fn distinct(rank_devices: &[usize]) -> Vec<usize> {
    let mut devs = rank_devices.to_vec();
    devs.sort_unstable();
    devs.dedup();
    devs
}

/// The selector's view of this process's ranks placed on `rank_devices` (rank -> device ordinal), with a
/// registered buffer of `custom_buffer_bytes`. Ranks on one device (virtual ranks) reach
/// each other trivially; across devices every pair must pass the driver's probe.
pub fn topology(rank_devices: &[usize], custom_buffer_bytes: usize) -> Result<Topology> {
    let devs = distinct(rank_devices);
    let mut p2p = true;
    for (x, &a) in devs.iter().enumerate() {
        for &b in &devs[x + 1..] {
            p2p &= can_access_peer(a, b)? && can_access_peer(b, a)?;
        }
    }
    Ok(Topology {
        world: rank_devices.len(),
        p2p_all_pairs: p2p,
        one_process: true,
        nccl_available: false,
        custom_buffer_bytes,
    })
}

/// Why the spinning P2P kernels must not run for ranks placed on `rank_devices`, or None.
/// Ranks sharing a device (virtual ranks) share its implicit synchronisation: a GPU without
/// stream-ordered allocation (memory pools) frees with `cuMemFree`, which waits for the whole
/// device, so a rank freeing a buffer while a peer's kernel spins for that rank's next launch
/// stalls both until the spin budget runs out. (With memory pools cudarc frees with
/// `cuMemFreeAsync`, ordered on the rank's own stream.) Ranks on devices of their own do not
/// share it. Every rank computes the same answer.
pub fn spin_hazard(rank_devices: &[usize]) -> Result<Option<String>> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED;
    for d in distinct(rank_devices) {
        if rank_devices.iter().filter(|&&x| x == d).count() < 2 {
            continue;
        }
        let pools = super::device_attribute(d, CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)?;
        if pools == 0 {
            return Ok(Some(format!(
                "GPU {d} holds several ranks and has no memory pools: a rank's cuMemFree would wait for peers' spinning kernels"
            )));
        }
    }
    Ok(None)
}

/// What [`survey`] found, as log lines: NVLink links per device and, per pair, the driver's
/// probe beside NVML's P2P read and NVLink status, flagged where they disagree.
pub fn survey_lines(devices: &[usize]) -> Result<Vec<String>> {
    let (links, pairs) = survey(devices)?;
    let mut out: Vec<String> = links
        .iter()
        .map(|(d, up)| match up {
            Some(n) => format!("topology: GPU {d}: {n} NVLink links up"),
            None => format!("topology: GPU {d}: NVML unavailable"),
        })
        .collect();
    for p in pairs {
        let nvml_ok = p.nvml_p2p_read.as_deref().map(|s| s == "ok");
        let note = match nvml_ok {
            Some(ok) if ok != p.driver_p2p => " (NVML and the driver disagree; the driver decides)",
            _ => "",
        };
        out.push(format!(
            "topology: GPU {} <-> GPU {}: driver P2P {}, NVML P2P read {}, NVLink {}{note}",
            p.a,
            p.b,
            p.driver_p2p,
            p.nvml_p2p_read.as_deref().unwrap_or("unknown"),
            p.nvml_nvlink.as_deref().unwrap_or("unknown"),
        ));
    }
    Ok(out)
}
