//! A pod's namespace and name from its UID, without the API server: kubelet
//! keeps one log directory per pod, `/var/log/pods/<namespace>_<name>_<uid>`
//! (`BuildPodLogsDirectory` in kubelet's `kuberuntime/helpers.go`).
//!
//! Splitting that name on `_` is unambiguous: a namespace is a DNS-1123
//! label (`[a-z0-9-]`, at most 63), a pod name a DNS-1123 subdomain
//! (`[a-z0-9.-]`, at most 253: `ValidatePodName` is `NameIsDNSSubdomain`),
//! and a UID is a UUID or, for static pods, 32 hex digits. None contains
//! `_`, so a directory name with other than three parts is not kubelet's and
//! is ignored.

use std::{collections::HashMap, fs, path::Path};

use serde::Serialize;

/// Where kubelet writes pod logs.
pub const POD_LOG_ROOT: &str = "/var/log/pods";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub uid: String,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

/// `<namespace>_<name>_<uid>` -> (uid, namespace, name).
fn split(dir_name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = dir_name.split('_');
    let (ns, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [ns, name, uid].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((uid, ns, name))
}

/// Every pod with a log directory under `root`: uid -> (namespace, name).
/// A missing or unreadable `root` is no pods (not a Kubernetes node).
pub(super) fn list(root: &Path) -> HashMap<String, (String, String)> {
    let mut pods = HashMap::new();
    for e in fs::read_dir(root).into_iter().flatten().flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some((uid, ns, pod)) = split(&name) {
            pods.insert(uid.to_owned(), (ns.to_owned(), pod.to_owned()));
        }
    }
    pods
}

/// The pod `uid`, named from the log directories under `root` (normally
/// [`POD_LOG_ROOT`]); name and namespace are `None` when it has none.
pub fn find_pod(uid: &str, root: &Path) -> Pod {
    let found = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let name = e.file_name();
            let (u, ns, pod) = split(name.to_str()?)?;
            (u == uid).then(|| (ns.to_owned(), pod.to_owned()))
        });
    named(uid, found)
}

pub(super) fn named(uid: &str, found: Option<(String, String)>) -> Pod {
    let (namespace, name) = found.unzip();
    Pod {
        uid: uid.to_owned(),
        name,
        namespace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_kubelet_directory_names() {
        assert_eq!(
            split("kube-system_coredns-5d78c9869d-x7k2p_0c5a1e4f-9b2d-4c6e-8f1a-2b3c4d5e6f70"),
            Some((
                "0c5a1e4f-9b2d-4c6e-8f1a-2b3c4d5e6f70",
                "kube-system",
                "coredns-5d78c9869d-x7k2p"
            ))
        );
        assert_eq!(split("a_b"), None);
        assert_eq!(split("a_b_c_d"), None);
        assert_eq!(split("a__c"), None);
    }

    #[test]
    fn finds_pods_in_a_log_directory() {
        let root = std::env::temp_dir().join(format!("tracer-pods-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let uid = "0c5a1e4f-9b2d-4c6e-8f1a-2b3c4d5e6f70";
        let static_uid = "33d556edd3ae8ef21980288cef77ae8b";
        for d in [
            format!("default_web-7f9c.v2_{uid}/nginx"),
            format!("kube-system_kube-apiserver-cp1_{static_uid}/kube-apiserver"),
            "not_a_pod_dir_at-all".into(),
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let pod = find_pod(uid, &root);
        let all = list(&root);
        let other = find_pod("11111111-2222-3333-4444-555555555555", &root);
        let absent = find_pod(uid, &root.join("nope"));
        fs::remove_dir_all(&root).unwrap();

        assert_eq!(pod.namespace.as_deref(), Some("default"));
        assert_eq!(pod.name.as_deref(), Some("web-7f9c.v2"));
        assert_eq!(pod.uid, uid);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(
            all[static_uid],
            ("kube-system".into(), "kube-apiserver-cp1".into())
        );
        assert_eq!((other.name, other.namespace), (None, None));
        assert_eq!((absent.name, absent.namespace), (None, None));
    }
}
