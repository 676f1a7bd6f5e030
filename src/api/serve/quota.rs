//! A tenant's quota: how many VMs, vCPUs and MiB of guest memory its live VMs may hold
//! together. Checked when a VM is created, against the VMs the registry holds.

use super::error::ServeError;
use super::vms::VmRecord;
use crate::config::serve::Quota;

/// Whether `tenant` may start one more VM of `vcpus` and `mem_mib` next to its `live` ones.
pub fn check<'a>(
    quota: &Quota,
    tenant: &str,
    live: impl IntoIterator<Item = &'a VmRecord>,
    vcpus: u32,
    mem_mib: u64,
) -> Result<(), ServeError> {
    let (count, used_vcpus, used_mem) = live
        .into_iter()
        .filter(|r| r.tenant == tenant && r.state.is_live())
        .fold((0u64, 0u64, 0u64), |(n, c, m), r| {
            (n + 1, c + u64::from(r.vcpus), m + r.mem_mib)
        });
    for (what, used, asked, max) in [
        ("VMs", count, 1, u64::from(quota.max_vms)),
        (
            "vCPUs",
            used_vcpus,
            u64::from(vcpus),
            u64::from(quota.max_vcpus),
        ),
        ("MiB of memory", used_mem, mem_mib, quota.max_mem_mib),
    ] {
        if used + asked > max {
            return Err(ServeError::Quota {
                tenant: tenant.to_string(),
                what,
                used,
                max,
                asked,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::serve::vms::VmState;

    fn vm(tenant: &str, state: VmState, vcpus: u32, mem_mib: u64) -> VmRecord {
        VmRecord {
            id: format!("{tenant}-{vcpus}-{mem_mib}"),
            tenant: tenant.into(),
            state,
            pid: None,
            pid_start: None,
            started: String::new(),
            exit: None,
            vcpus,
            mem_mib,
            config: Default::default(),
            disks: Vec::new(),
            ended: None,
            last_snapshot: None,
        }
    }

    #[test]
    fn only_the_tenants_own_live_vms_count_against_its_quota() {
        let quota = Quota {
            max_vms: 2,
            max_vcpus: 4,
            max_mem_mib: 1024,
        };
        let vms = [
            vm("a", VmState::Running, 2, 512),
            vm("a", VmState::Exited, 4, 1024),
            vm("b", VmState::Running, 4, 1024),
        ];
        assert!(check(&quota, "a", &vms, 2, 512).is_ok());
        let err = check(&quota, "a", &vms, 3, 128).unwrap_err();
        assert!(
            matches!(
                &err,
                ServeError::Quota {
                    what: "vCPUs",
                    used: 2,
                    max: 4,
                    asked: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(check(&quota, "a", &vms, 1, 513).is_err());
        let full = [
            vm("a", VmState::Running, 1, 16),
            vm("a", VmState::Paused, 1, 16),
        ];
        assert!(matches!(
            check(&quota, "a", &full, 1, 16),
            Err(ServeError::Quota { what: "VMs", .. })
        ));
    }
}
