//! What a cgroup v2 path says about the processes in it: their container,
//! their Kubernetes pod, their systemd unit. Pure string work, so every
//! runtime's layout is tested here without that runtime.
//!
//! The path is the one seen from the root of the v2 hierarchy
//! (`/system.slice/docker-<id>.scope`). Layouts recognised, per component:
//!
//! | component                                   | meaning                      |
//! |---------------------------------------------|------------------------------|
//! | `docker-<id>.scope`, `docker/<id>`          | docker (systemd, cgroupfs)   |
//! | `cri-containerd-<id>.scope`, `pod<uid>/<id>`| containerd (systemd, cgroupfs)|
//! | `crio-<id>.scope`, `crio-<id>`              | cri-o                        |
//! | `libpod-<id>.scope`, `libpod-<id>`          | podman                       |
//! | `kubepods[-<qos>]-pod<uid_>.slice`, `kubepods/[<qos>/]pod<uid>` | pod |
//! | `<name>.service`, `<name>.scope`            | systemd unit                 |
//!
//! Decisions:
//! - A container id is exactly 64 lowercase hex digits: docker, containerd,
//!   cri-o and podman all name cgroups with the full id (the 12-digit form
//!   is only a display abbreviation). Being strict keeps a unit that merely
//!   starts with `docker-` from becoming a container. `crio-conmon-<id>` and
//!   `libpod-conmon-<id>` (the runtime's monitor process, not the
//!   container) fail this test by construction and count as plain units.
//! - A bare `<id>` directly under a pod is reported as containerd: it is
//!   what containerd writes with kubelet's cgroupfs driver (cri-dockerd
//!   writes the same shape and is indistinguishable from the path).
//! - Nested containers (docker-in-docker, kind, a runtime's `init` or
//!   `container` sub-cgroup): the innermost container wins, because that is
//!   the one whose process owns the socket; sub-cgroups of a container
//!   belong to it.
//! - `unit` is the innermost `.service`/`.scope` inside the innermost
//!   container, or anywhere when there is no container; a container's own
//!   scope is not a unit. So `nginx.service` names nginx, a systemd inside a
//!   container shows its own units, and rootless podman does not report the
//!   user manager (`user@1000.service`) it happens to run under.
//! - Pod UIDs: the slice form writes `-` as `_`; the real UID is returned.
//!   Accepted are UUIDs (36 characters) and the 32-hex-digit UIDs kubelet
//!   gives static pods (an md5 of the manifest).

use std::fmt;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Runtime {
    #[serde(rename = "docker")]
    Docker,
    #[serde(rename = "containerd")]
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    #[serde(rename = "podman")]
    Podman,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    /// 64 lowercase hex digits.
    pub id: String,
    pub runtime: Runtime,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Parsed {
    pub container: Option<Container>,
    /// The pod's real UID (with dashes).
    pub pod_uid: Option<String>,
    /// A systemd unit, such as `nginx.service` or `session-3.scope`.
    pub unit: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_pod_uid(s: &str) -> bool {
    let hex = |b: u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
    match s.len() {
        32 => s.bytes().all(hex),
        36 => s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => hex(b),
        }),
        _ => false,
    }
}

/// The container a single component names; `parent` is the component
/// above it, `under_pod` whether that parent was a pod.
fn container(comp: &str, parent: &str, under_pod: bool) -> Option<Container> {
    let stem = comp.strip_suffix(".scope").unwrap_or(comp);
    let prefixed = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("libpod-", Runtime::Podman),
    ];
    let found = prefixed
        .iter()
        .find_map(|&(prefix, rt)| Some((stem.strip_prefix(prefix)?, rt)))
        .filter(|(id, _)| is_container_id(id))
        .or_else(|| {
            let runtime = if parent == "docker" {
                Runtime::Docker
            } else if under_pod {
                Runtime::Containerd
            } else {
                return None;
            };
            is_container_id(comp).then_some((comp, runtime))
        })?;
    Some(Container {
        id: found.0.to_string(),
        runtime: found.1,
    })
}

/// The pod UID a single component names; `in_kubepods` whether a
/// `kubepods` component was seen above it (the cgroupfs form).
fn pod_uid(comp: &str, in_kubepods: bool) -> Option<String> {
    let uid = if let Some(stem) = comp.strip_suffix(".slice") {
        if !stem.contains("kubepods") {
            return None;
        }
        stem.rsplit('-')
            .next()?
            .strip_prefix("pod")?
            .replace('_', "-")
    } else if in_kubepods {
        comp.strip_prefix("pod")?.to_string()
    } else {
        return None;
    };
    is_pod_uid(&uid).then_some(uid)
}

fn is_unit(comp: &str) -> bool {
    comp.len() > ".scope".len() && (comp.ends_with(".service") || comp.ends_with(".scope"))
}

/// Container, pod and unit of a cgroup v2 path; see the module doc.
pub fn parse(path: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let mut parent = "";
    let mut parent_is_pod = false;
    let mut in_kubepods = false;
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        let mut is_pod = false;
        if let Some(uid) = pod_uid(comp, in_kubepods) {
            parsed.pod_uid = Some(uid);
            is_pod = true;
        } else if let Some(c) = container(comp, parent, parent_is_pod) {
            parsed.container = Some(c);
            parsed.unit = None;
        } else if is_unit(comp) {
            parsed.unit = Some(comp.to_string());
        }
        in_kubepods |= comp == "kubepods" || comp.starts_with("kubepods-");
        parent = comp;
        parent_is_pod = is_pod;
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e2b0c9d8a7f6e5d4c3b2a19080706f5e4d3c2b1a09f8e7d6c5b4a39281706";
    const ID2: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const UID: &str = "0c5a1e4f-9b2d-4c6e-8f1a-2b3c4d5e6f70";
    const UID_: &str = "0c5a1e4f_9b2d_4c6e_8f1a_2b3c4d5e6f70";

    fn c(rt: Runtime, id: &str) -> Option<Container> {
        Some(Container {
            id: id.into(),
            runtime: rt,
        })
    }

    fn check(path: &str, container: Option<Container>, pod: Option<&str>, unit: Option<&str>) {
        let want = Parsed {
            container,
            pod_uid: pod.map(Into::into),
            unit: unit.map(Into::into),
        };
        assert_eq!(parse(path), want, "{path}");
    }

    #[test]
    fn docker() {
        check(
            &format!("/system.slice/docker-{ID}.scope"),
            c(Runtime::Docker, ID),
            None,
            None,
        );
        check(&format!("/docker/{ID}"), c(Runtime::Docker, ID), None, None);
    }

    #[test]
    fn containerd_under_kubernetes() {
        for qos in ["burstable", "besteffort"] {
            let p = format!(
                "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_}.slice/cri-containerd-{ID}.scope"
            );
            check(&p, c(Runtime::Containerd, ID), Some(UID), None);
            check(
                &format!("/kubepods/{qos}/pod{UID}/{ID}"),
                c(Runtime::Containerd, ID),
                Some(UID),
                None,
            );
        }
        // Guaranteed QoS: no QoS level in between.
        let p = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope");
        check(&p, c(Runtime::Containerd, ID), Some(UID), None);
        check(
            &format!("/kubepods/pod{UID}/{ID}"),
            c(Runtime::Containerd, ID),
            Some(UID),
            None,
        );
        // A static pod's UID (md5 of its manifest), and its pause sandbox.
        let static_uid = "33d556edd3ae8ef21980288cef77ae8b";
        check(
            &format!("/kubepods/burstable/pod{static_uid}/{ID2}"),
            c(Runtime::Containerd, ID2),
            Some(static_uid),
            None,
        );
        // The pod slice alone (a process of the pod outside any container).
        check(
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice"),
            None,
            Some(UID),
            None,
        );
    }

    #[test]
    fn cri_o() {
        let pod =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        check(
            &format!("{pod}/crio-{ID}.scope"),
            c(Runtime::CriO, ID),
            Some(UID),
            None,
        );
        // conmon monitors the container; it is not the container.
        let conmon = format!("crio-conmon-{ID}.scope");
        check(&format!("{pod}/{conmon}"), None, Some(UID), Some(&conmon));
        check(
            &format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
            c(Runtime::CriO, ID),
            Some(UID),
            None,
        );
    }

    #[test]
    fn podman() {
        check(
            &format!("/machine.slice/libpod-{ID}.scope"),
            c(Runtime::Podman, ID),
            None,
            None,
        );
        let rootless =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
        check(&rootless, c(Runtime::Podman, ID), None, None);
        let conmon = format!("libpod-conmon-{ID}.scope");
        check(
            &format!("/machine.slice/{conmon}"),
            None,
            None,
            Some(&conmon),
        );
        // crun's sub-cgroup of a container with systemd inside.
        check(
            &format!("/machine.slice/libpod-{ID}.scope/container"),
            c(Runtime::Podman, ID),
            None,
            None,
        );
    }

    #[test]
    fn systemd_units_without_container() {
        check(
            "/system.slice/nginx.service",
            None,
            None,
            Some("nginx.service"),
        );
        check(
            "/user.slice/user-1000.slice/session-3.scope",
            None,
            None,
            Some("session-3.scope"),
        );
        check(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox.scope",
            None,
            None,
            Some("app-firefox.scope"),
        );
        // PID 1 alone: a unit, and a useful one (socket activation).
        check("/init.scope", None, None, Some("init.scope"));
    }

    #[test]
    fn non_matches() {
        for p in [
            "",
            "/",
            "/user.slice",
            "/system.slice",
            "/kubepods.slice",
            "/kubepods/burstable",
        ] {
            check(p, None, None, None);
        }
        // Short, upper-case or non-hex ids are not containers.
        check(
            "/system.slice/docker-3f4e2b0c9d8a.scope",
            None,
            None,
            Some("docker-3f4e2b0c9d8a.scope"),
        );
        check(&format!("/docker/{}", ID.to_uppercase()), None, None, None);
        check(&format!("/docker/{}", &ID[..63]), None, None, None);
        // A bare id with no runtime around it says nothing.
        check(&format!("/{ID}"), None, None, None);
        // `pod…` outside kubepods, and a malformed UID.
        check(&format!("/pod{UID}/{ID}"), None, None, None);
        check(
            "/kubepods.slice/kubepods-podnot_a_uid.slice",
            None,
            None,
            None,
        );
    }

    #[test]
    fn nested_innermost_container_wins() {
        // docker-in-docker (cgroupfs driver inside, systemd outside).
        let p = format!("/system.slice/docker-{ID}.scope/docker/{ID2}");
        check(&p, c(Runtime::Docker, ID2), None, None);
        // A container's own sub-cgroup.
        let p = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope/init");
        check(&p, c(Runtime::Containerd, ID), Some(UID), None);
        // kind: kubelet with --cgroup-root=/kubelet inside a docker container.
        let p = format!(
            "/system.slice/docker-{ID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID2}.scope"
        );
        check(&p, c(Runtime::Containerd, ID2), Some(UID), None);
        // systemd inside a container: its units are reported, the outer one is not.
        let p = format!("/system.slice/foo.service/docker/{ID}/system.slice/nginx.service");
        check(&p, c(Runtime::Docker, ID), None, Some("nginx.service"));
    }

    #[test]
    fn runtime_names() {
        let names: Vec<String> = [
            Runtime::Docker,
            Runtime::Containerd,
            Runtime::CriO,
            Runtime::Podman,
        ]
        .iter()
        .map(|r| {
            assert_eq!(serde_json::to_string(r).unwrap(), format!("\"{r}\""));
            r.to_string()
        })
        .collect();
        assert_eq!(names, ["docker", "containerd", "cri-o", "podman"]);
    }
}
