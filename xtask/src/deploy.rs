//! `cargo xtask test`'s check of `deploy/`: the DaemonSet manifest is
//! validated against the Kubernetes API schemas, and the privileges it
//! grants are compared with what `docs/deployment.md` says the tracer
//! needs.
//!
//! No cluster is needed: kubernetes-validate (PyPI) bundles the API's
//! JSON schemas of every Kubernetes minor it supports. Its `--strict` mode
//! rejects unknown fields, so a misspelt key (`readOnyl`) fails as well as
//! a wrong type. Debian's kubectl (1.20) cannot do this offline: its
//! client-side validation asks an API server for the schema.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize as _;
use serde_json::Value;

use crate::setup::output;

pub(crate) const VALIDATOR_VERSION: &str = "1.37.0";

/// The Kubernetes minors the manifest must be valid for: every one
/// kubernetes-validate 1.37.0 bundles schemas of (1.25 to 1.37).
const KUBE_MINORS: std::ops::RangeInclusive<u32> = 25..=37;

const MANIFEST: &str = "deploy/kubernetes/daemonset.yaml";

/// The page that says which privileges the tracer needs: its systemd
/// section names the capabilities, its DaemonSet section has the table of
/// host mounts.
pub(crate) const PRIVILEGES_DOC: &str = "docs/deployment.md";

/// The validator's own virtual environment, one per version, so that an
/// upgrade is a new directory and nothing touches the system's Python.
fn validator_dir() -> Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME not set")?;
    Ok(PathBuf::from(home)
        .join(".local/share")
        .join(format!("kubernetes-validate-{VALIDATOR_VERSION}")))
}

fn validator_version(bin: &std::path::Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Installs kubernetes-validate in its virtual environment unless the
/// right version is already there (checked by running it).
fn ensure_validator() -> Result<PathBuf> {
    let dir = validator_dir()?;
    let bin = dir.join("bin/kubernetes-validate");
    if validator_version(&bin).as_deref() == Some(VALIDATOR_VERSION) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing kubernetes-validate {VALIDATOR_VERSION} (PyPI) in {}",
        dir.display()
    );
    output(Command::new("python3").arg("-m").arg("venv").arg(&dir))?;
    output(
        Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("kubernetes-validate=={VALIDATOR_VERSION}")),
    )?;
    match validator_version(&bin) {
        Some(v) if v == VALIDATOR_VERSION => Ok(bin),
        got => bail!("kubernetes-validate was installed but reports version {got:?}, not {VALIDATOR_VERSION}"),
    }
}

/// The check `cargo xtask test` runs before the integration tests.
pub(crate) fn check() -> Result<()> {
    let root = crate::workspace_root();
    let bin = ensure_validator()?;
    for minor in KUBE_MINORS {
        let version = format!("1.{minor}.0");
        let out = Command::new(&bin)
            .args([
                "--strict",
                "--quiet",
                "--kubernetes-version",
                &version,
                MANIFEST,
            ])
            .current_dir(&root)
            .output()
            .context("running kubernetes-validate")?;
        if !out.status.success() {
            // Its ERROR lines name the resource, the field and the problem.
            let why = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            bail!(
                "{MANIFEST} is not a valid Kubernetes {version} manifest: {}",
                why.trim().replace('\n', "; ")
            );
        }
    }
    check_privileges(
        &read(&root, MANIFEST)?,
        &read(&root, PRIVILEGES_DOC)?,
        &read(&root, "deploy/systemd/tracer.service")?,
    )?;
    eprintln!(
        "xtask: {MANIFEST}: valid for Kubernetes 1.{}-1.{} (kubernetes-validate {VALIDATOR_VERSION}, strict); grants what {PRIVILEGES_DOC} says",
        KUBE_MINORS.start(),
        KUBE_MINORS.end()
    );
    Ok(())
}

fn read(root: &std::path::Path, path: &str) -> Result<String> {
    std::fs::read_to_string(root.join(path)).with_context(|| format!("reading {path}"))
}

/// The lines of the doc's section `heading` (up to the next heading of
/// the same or a higher level).
fn section<'a>(doc: &'a str, heading: &str) -> Result<Vec<&'a str>> {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut lines = doc.lines().skip_while(|l| l.trim_end() != heading);
    if lines.next().is_none() {
        bail!("{PRIVILEGES_DOC} has no section {heading:?}");
    }
    Ok(lines
        .take_while(|l| {
            let hashes = l.chars().take_while(|&c| c == '#').count();
            !(hashes > 0 && hashes <= level && l[hashes..].starts_with(' '))
        })
        .collect())
}

/// `CAP_…` words of `text`.
fn capability_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("CAP_") && w.len() > 4)
        .map(str::to_string)
        .collect()
}

/// The DaemonSet grants exactly what `doc` (docs/deployment.md) says the
/// tracer needs:
/// - its containers add exactly the capabilities the doc's systemd
///   section names (which the systemd unit's bounding set also is), drop
///   all others, and are not privileged;
/// - its host paths are exactly those of the doc's DaemonSet table of
///   host mounts, each mounted read-only at the same path;
/// - it shares the host's PID namespace (other pods' /proc) and not the
///   host's network.
pub(crate) fn check_privileges(manifest: &str, doc: &str, unit: &str) -> Result<()> {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(manifest)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()
        .context("the manifest is not YAML")?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("the manifest has no DaemonSet")?;
    let name = ds["metadata"]["name"].as_str().unwrap_or("?");
    let pod = &ds["spec"]["template"]["spec"];

    let systemd = section(doc, "## As a systemd service")?.join("\n");
    let needed = capability_words(&systemd);
    if needed.is_empty() {
        bail!("{PRIVILEGES_DOC}'s \"As a systemd service\" names no CAP_ capability");
    }
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .map(capability_words)
        .context("deploy/systemd/tracer.service has no CapabilityBoundingSet")?;
    if bounding != needed {
        bail!("deploy/systemd/tracer.service bounds capabilities to {bounding:?}, {PRIVILEGES_DOC} says {needed:?}");
    }

    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[k].as_array().into_iter().flatten())
        .collect();
    if containers.is_empty() {
        bail!("DaemonSet {name} has no containers");
    }
    let mut mounts: BTreeSet<(String, String)> = BTreeSet::new();
    for c in &containers {
        let cname = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        let added: BTreeSet<String> = sc["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            // Kubernetes takes both spellings; compare in the doc's.
            .map(|cap| match cap.strip_prefix("CAP_") {
                Some(_) => cap.to_string(),
                None => format!("CAP_{cap}"),
            })
            .collect();
        if added != needed {
            bail!("container {cname} adds capabilities {added:?}; {PRIVILEGES_DOC} says the tracer needs {needed:?}");
        }
        if sc["capabilities"]["drop"] != serde_json::json!(["ALL"]) {
            bail!(
                "container {cname} must drop ALL other capabilities, drops {}",
                sc["capabilities"]["drop"]
            );
        }
        if sc["privileged"] == true || sc["allowPrivilegeEscalation"] != false {
            bail!("container {cname} must be neither privileged nor allowed privilege escalation");
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vol = m["name"].as_str().unwrap_or("?");
            let Some(host) = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == vol)
                .and_then(|v| v["hostPath"]["path"].as_str())
            else {
                continue;
            };
            let at = m["mountPath"].as_str().unwrap_or("?");
            if m["readOnly"] != true {
                bail!(
                    "container {cname} mounts host path {host} writable; the tracer only reads it"
                );
            }
            if at != host {
                bail!("container {cname} mounts host path {host} at {at}: the tracer looks for it at {host}");
            }
            mounts.insert((cname.to_string(), host.to_string()));
        }
    }
    let host_paths: BTreeSet<String> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .map(str::to_string)
        .collect();

    // The doc's DaemonSet section lists the host mounts in a table
    // whose rows start with the path: | `/sys/kernel/tracing` | … |
    let documented: BTreeSet<String> = section(doc, "## As a Kubernetes DaemonSet")?
        .iter()
        .filter_map(|l| l.strip_prefix("| `/"))
        .filter_map(|l| l.split_once('`'))
        .map(|(path, _)| format!("/{path}"))
        .collect();
    if documented.is_empty() {
        bail!("{PRIVILEGES_DOC}'s \"As a Kubernetes DaemonSet\" has no table of host mounts (rows starting | `/path` |)");
    }
    if host_paths != documented {
        bail!("DaemonSet {name} mounts host paths {host_paths:?}; {PRIVILEGES_DOC} documents {documented:?}");
    }
    for c in &containers {
        let cname = c["name"].as_str().unwrap_or("?");
        for path in &host_paths {
            if !mounts.contains(&(cname.to_string(), path.clone())) {
                bail!("container {cname} does not mount host path {path}");
            }
        }
    }
    if pod["hostPID"] != true {
        bail!("DaemonSet {name} needs hostPID: true (other pods' network namespaces are found in /proc)");
    }
    if pod["hostNetwork"] == true {
        bail!("DaemonSet {name} must not use the host network: the tracepoint sees every namespace without it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (String, String, String) {
        let root = crate::workspace_root();
        (
            read(&root, MANIFEST).unwrap(),
            read(&root, PRIVILEGES_DOC).unwrap(),
            read(&root, "deploy/systemd/tracer.service").unwrap(),
        )
    }

    #[test]
    fn the_daemonset_grants_what_the_docs_say() {
        let (manifest, doc, unit) = files();
        check_privileges(&manifest, &doc, &unit).unwrap();
    }

    /// Each way the manifest can drift from the docs is caught.
    #[test]
    fn a_drifting_manifest_is_refused() {
        let (manifest, doc, unit) = files();
        let caps = r#"add: ["BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_PTRACE", "SYS_ADMIN"]"#;
        for (what, from, to) in [
            (
                "an extra capability",
                caps,
                r#"add: ["BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_PTRACE", "SYS_ADMIN", "NET_ADMIN"]"#,
            ),
            (
                "a missing capability",
                caps,
                r#"add: ["BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_PTRACE"]"#,
            ),
            ("a writable host mount", "readOnly: true", "readOnly: false"),
            ("privileged", "privileged: false", "privileged: true"),
            ("no host PID namespace", "hostPID: true", "hostPID: false"),
        ] {
            assert!(
                manifest.contains(from),
                "{what}: no {from:?} in the manifest"
            );
            let bad = manifest.replacen(from, to, 1);
            let err = check_privileges(&bad, &doc, &unit).expect_err(what);
            eprintln!("{what}: {err}");
        }
        // Mounted where it is, but not in the doc's table.
        let bad = manifest.replace("/sys/fs/cgroup", "/sys/fs/bpf");
        let err = check_privileges(&bad, &doc, &unit).expect_err("an undocumented host path");
        assert!(
            err.to_string().contains("docs/deployment.md documents"),
            "{err}"
        );
        let doc_without = doc.replace("CAP_SYS_ADMIN", "CAP_SOMETHING");
        assert!(check_privileges(&manifest, &doc_without, &unit).is_err());
    }

    #[test]
    fn sections_end_at_the_next_heading_of_their_level() {
        let text = "## A\na\n### B\nb\n#### C\nc\n### D\nd\n";
        assert_eq!(section(text, "### B").unwrap(), ["b", "#### C", "c"]);
        assert!(section(text, "### E").is_err());
    }
}
