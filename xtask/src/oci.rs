//! `cargo xtask dist --oci`: the container image of
//! `deploy/kubernetes/Dockerfile`, written without a container engine as an
//! OCI image layout (image-spec v1.1), for linux/amd64 and linux/arm64.
//!
//! - one layer per platform: `/usr/local/bin/tracer`, the very binary of
//!   that platform's dist tarball, read back from the tarball (the Dockerfile
//!   does the same with `ADD`), nothing else (`FROM scratch`);
//! - the configuration of the Dockerfile: entrypoint, default arguments,
//!   user root, the metrics port;
//! - `index.json` names the tag `<version>` and points to the image index
//!   listing both platforms' manifests, as `docker buildx build
//!   --output type=oci` does; `skopeo copy --all
//!   oci:target/dist/tracer-<version>-oci:<version> docker://REGISTRY/tracer:<version>`
//!   pushes both.
//!
//! JSON documents are built with oci-spec's types and written with sorted
//! keys, so that the same binaries give the same digests.
//!
//! [`check`] is `cargo xtask test`'s check of the layout, of the
//! Dockerfile's agreement with it, and of the DaemonSet that runs it.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context as _, Result};
use oci_spec::image::{
    Arch as OciArch, ConfigBuilder, Descriptor, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, OciLayout, OciLayoutBuilder, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
    ANNOTATION_REF_NAME,
};
use serde::Serialize;

use crate::{
    dist::{self, gunzip, gzip, read_tar, sha256_hex, stem, tar_entry, Artifact, Dist, VERSION},
    elf::Elf,
    vm::Arch,
    workspace_root,
};

/// Where the image puts the binary, and runs it.
pub(crate) const ENTRYPOINT: &str = "/usr/local/bin/tracer";
/// Its default arguments (the DaemonSet passes its own).
pub(crate) const CMD: &[&str] = &["--metrics", "0.0.0.0:9975", "--events", "none"];
/// Root: the capabilities the DaemonSet adds are root's (docs/deployment.md,
/// "As a Kubernetes DaemonSet").
pub(crate) const USER: &str = "0:0";
pub(crate) const PORT: &str = "9975/tcp";

const DOCKERFILE: &str = "deploy/kubernetes/Dockerfile";
const MANIFEST: &str = "deploy/kubernetes/daemonset.yaml";

pub(crate) fn layout_dir() -> PathBuf {
    dist::dist_dir().join(format!("tracer-{VERSION}-oci"))
}

fn oci_arch(arch: Arch) -> OciArch {
    match arch {
        Arch::X86_64 => OciArch::Amd64,
        Arch::Aarch64 => OciArch::ARM64,
    }
}

fn variant(arch: Arch) -> Option<&'static str> {
    match arch {
        Arch::X86_64 => None,
        Arch::Aarch64 => Some("v8"),
    }
}

/// JSON with sorted keys (serde_json's map is a BTreeMap): oci-spec keeps
/// annotations and labels in HashMaps, whose order changes per run.
fn canonical_json(v: &impl Serialize) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(v)?)?)
}

/// RFC 3339 of a Unix time (UTC).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    /// Stores `bytes` under their digest and describes them.
    fn put(&self, media_type: MediaType, bytes: &[u8]) -> Result<Descriptor> {
        let hex = sha256_hex(bytes);
        fs::write(self.dir.join(&hex), bytes)?;
        let digest: Sha256Digest = hex.parse()?;
        Ok(Descriptor::new(media_type, bytes.len() as u64, digest))
    }
}

/// The image's one layer for `arch`: the binary of its tarball.
fn layer(binary: &[u8], mtime: u64) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["usr/", "usr/local/", "usr/local/bin/"] {
        tar_entry(&mut tar, dir, None, 0o755, mtime)?;
    }
    let path = ENTRYPOINT.trim_start_matches('/');
    tar_entry(&mut tar, path, Some(binary), 0o755, mtime)?;
    Ok(tar.into_inner()?)
}

/// The binary of `a`'s tarball.
fn tarball_binary(a: &Artifact) -> Result<Vec<u8>> {
    let entries = dist::read_tarball(&a.tarball)?;
    let name = format!("{}/tracer", stem(a.arch));
    entries
        .get(&name)
        .and_then(|(_, d)| d.clone())
        .with_context(|| format!("{} has no {name}", a.tarball.display()))
}

/// Writes the layout and its oci-archive; returns both paths.
pub(crate) fn write(artifacts: &[Artifact], mtime: u64) -> Result<(PathBuf, PathBuf)> {
    let root = layout_dir();
    let _ = fs::remove_dir_all(&root);
    let blobs = Blobs {
        dir: root.join("blobs/sha256"),
    };
    fs::create_dir_all(&blobs.dir)?;
    let created = rfc3339(mtime);
    let mut manifests = Vec::new();
    for a in artifacts {
        let layer_tar = layer(&tarball_binary(a)?, mtime)?;
        let diff_id = format!("sha256:{}", sha256_hex(&layer_tar));
        let layer = blobs.put(MediaType::ImageLayerGzip, &gzip(&layer_tar)?)?;
        let config = ConfigBuilder::default()
            .user(USER)
            .entrypoint(vec![ENTRYPOINT.to_string()])
            .cmd(CMD.iter().map(ToString::to_string).collect::<Vec<_>>())
            .exposed_ports(vec![PORT.to_string()])
            .labels(
                [
                    ("org.opencontainers.image.title", "tracer"),
                    ("org.opencontainers.image.version", VERSION),
                    ("org.opencontainers.image.licenses", "MIT OR Apache-2.0"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>(),
            )
            .build()?;
        let mut image = ImageConfigurationBuilder::default()
            .created(created.clone())
            .architecture(oci_arch(a.arch))
            .os(Os::Linux)
            .config(config)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![diff_id])
                    .build()?,
            )
            .history(vec![HistoryBuilder::default()
                .created(created.clone())
                .created_by(format!(
                    "COPY {}/tracer {ENTRYPOINT} # cargo xtask dist --oci",
                    stem(a.arch)
                ))
                .build()?]);
        if let Some(v) = variant(a.arch) {
            image = image.variant(v);
        }
        let config = blobs.put(MediaType::ImageConfig, &canonical_json(&image.build()?)?)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(config)
            .layers(vec![layer])
            .build()?;
        let mut descriptor = blobs.put(MediaType::ImageManifest, &canonical_json(&manifest)?)?;
        let mut platform = PlatformBuilder::default()
            .architecture(oci_arch(a.arch))
            .os(Os::Linux);
        if let Some(v) = variant(a.arch) {
            platform = platform.variant(v);
        }
        descriptor.set_platform(Some(platform.build()?));
        manifests.push(descriptor);
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()?;
    let mut tagged = blobs.put(MediaType::ImageIndex, &canonical_json(&index)?)?;
    tagged.set_annotations(Some(
        [(ANNOTATION_REF_NAME.to_string(), VERSION.to_string())]
            .into_iter()
            .collect(),
    ));
    let top = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![tagged])
        .build()?;
    fs::write(root.join("index.json"), canonical_json(&top)?)?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;
    fs::write(root.join("oci-layout"), canonical_json(&layout)?)?;

    // The same as one tar (oci-archive), in a fixed order.
    let mut tar = tar::Builder::new(Vec::new());
    tar_entry(
        &mut tar,
        "oci-layout",
        Some(&fs::read(root.join("oci-layout"))?),
        0o644,
        mtime,
    )?;
    tar_entry(
        &mut tar,
        "index.json",
        Some(&fs::read(root.join("index.json"))?),
        0o644,
        mtime,
    )?;
    tar_entry(&mut tar, "blobs/", None, 0o755, mtime)?;
    tar_entry(&mut tar, "blobs/sha256/", None, 0o755, mtime)?;
    let mut names: Vec<String> = fs::read_dir(&blobs.dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        tar_entry(
            &mut tar,
            &format!("blobs/sha256/{n}"),
            Some(&fs::read(blobs.dir.join(&n))?),
            0o644,
            mtime,
        )?;
    }
    let archive = dist::dist_dir().join(format!("tracer-{VERSION}-oci.tar"));
    fs::write(&archive, tar.into_inner()?)?;
    Ok((root, archive))
}

/// A blob of the layout, verified against its descriptor (size and digest).
fn read_blob(root: &Path, d: &Descriptor) -> Result<Vec<u8>> {
    let hex = d
        .as_digest_sha256()
        .with_context(|| format!("{} is not a sha256 digest", d.digest()))?;
    let path = root.join("blobs/sha256").join(hex);
    let bytes = fs::read(&path).with_context(|| format!("blob {} is missing", d.digest()))?;
    ensure!(
        bytes.len() as u64 == d.size(),
        "blob {} is {} bytes, its descriptor says {}",
        d.digest(),
        bytes.len(),
        d.size()
    );
    ensure!(
        sha256_hex(&bytes) == hex,
        "blob {} does not match its digest",
        d.digest()
    );
    Ok(bytes)
}

/// What the Dockerfile says: `(instruction, arguments)` in order.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(i, a)| (i.to_ascii_uppercase(), a.trim().to_string()))
        .collect()
}

/// The Dockerfile builds the same image from the same tarballs: only
/// `scratch` stages, the tarball of the version, and the configuration
/// written by [`write`].
pub(crate) fn check_dockerfile(text: &str) -> Result<()> {
    let ins = dockerfile_instructions(text);
    let all = |name: &str| -> Vec<&String> {
        ins.iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a)
            .collect()
    };
    let last = |name: &str| -> Result<&String> {
        all(name)
            .last()
            .copied()
            .with_context(|| format!("{DOCKERFILE} has no {name}"))
    };
    let froms = all("FROM");
    ensure!(!froms.is_empty(), "{DOCKERFILE} has no FROM");
    for f in &froms {
        let base = f.split_whitespace().next().unwrap_or_default();
        ensure!(
            base == "scratch" || froms.iter().any(|o| o.ends_with(&format!(" AS {base}"))),
            "{DOCKERFILE}: FROM {f}: the image is the static binary alone (FROM scratch)"
        );
    }
    ensure!(
        all("ARG")
            .iter()
            .any(|a| **a == format!("VERSION={VERSION}")),
        "{DOCKERFILE} must default ARG VERSION to {VERSION}, the workspace's version"
    );
    ensure!(
        all("ADD")
            .iter()
            .any(|a| a.contains("tracer-${VERSION}-${TARGETARCH}-linux.tar.gz")),
        "{DOCKERFILE} must ADD the dist tarball tracer-${{VERSION}}-${{TARGETARCH}}-linux.tar.gz"
    );
    let entrypoint: Vec<String> = serde_json::from_str(last("ENTRYPOINT")?)
        .context("ENTRYPOINT in exec form (a JSON array)")?;
    ensure!(
        entrypoint == [ENTRYPOINT],
        "{DOCKERFILE}: ENTRYPOINT {entrypoint:?}, the OCI image's is [{ENTRYPOINT:?}]"
    );
    ensure!(
        all("COPY")
            .iter()
            .any(|a| a.ends_with(&format!(" {ENTRYPOINT}"))),
        "{DOCKERFILE} does not copy the tracer to {ENTRYPOINT}"
    );
    let cmd: Vec<String> =
        serde_json::from_str(last("CMD")?).context("CMD in exec form (a JSON array)")?;
    ensure!(
        cmd == CMD,
        "{DOCKERFILE}: CMD {cmd:?}, the OCI image's is {CMD:?}"
    );
    ensure!(
        *last("USER")? == USER,
        "{DOCKERFILE}: USER {}, the OCI image's is {USER}",
        last("USER")?
    );
    ensure!(
        *last("EXPOSE")? == PORT,
        "{DOCKERFILE}: EXPOSE {}, the OCI image's is {PORT}",
        last("EXPOSE")?
    );
    Ok(())
}

/// The user runs as root: uid 0 (by number or name), any group.
fn runs_as_root(user: &str) -> bool {
    let uid = user.split(':').next().unwrap_or_default();
    uid.is_empty() || uid == "0" || uid == "root"
}

/// The DaemonSet runs this image (same tag), as root, with the entrypoint's
/// arguments; and grants what docs/deployment.md documents (`deploy.rs`).
pub(crate) fn check_daemonset(manifest: &str, doc: &str, unit: &str) -> Result<()> {
    use serde::Deserialize as _;
    crate::deploy::check_privileges(manifest, doc, unit)?;
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(manifest)
        .map(serde_json::Value::deserialize)
        .collect::<Result<_, _>>()?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("no containers")?;
    for c in containers {
        let name = c["name"].as_str().unwrap_or("?");
        let image = c["image"].as_str().context("a container without image")?;
        let (repo, tag) = image
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .with_context(|| format!("container {name}: image {image} has no tag"))?;
        ensure!(
            repo.ends_with("/tracer") && tag == VERSION,
            "container {name} runs {image}; the image `cargo xtask dist --oci` writes is tracer:{VERSION}"
        );
        ensure!(
            c["command"].is_null(),
            "container {name} replaces the image's entrypoint ({ENTRYPOINT})"
        );
        let uid = &c["securityContext"]["runAsUser"];
        ensure!(
            uid.is_null() || *uid == 0,
            "container {name} runs as user {uid}: the tracer runs as root with the capabilities added"
        );
    }
    Ok(())
}

/// `cargo xtask test`'s check of the layout written by [`write`].
pub(crate) fn check(root: &Path, dist: &Dist) -> Result<()> {
    let layout = OciLayout::from_file(root.join("oci-layout")).context("oci-layout")?;
    ensure!(
        layout.image_layout_version() == "1.0.0",
        "oci-layout: version {}",
        layout.image_layout_version()
    );
    let top = ImageIndex::from_file(root.join("index.json")).context("index.json")?;
    let [tagged] = top.manifests().as_slice() else {
        bail!(
            "index.json lists {} descriptors, expected one: the tag {VERSION}",
            top.manifests().len()
        );
    };
    let tag = tagged
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REF_NAME));
    ensure!(
        tag.map(String::as_str) == Some(VERSION),
        "index.json tags {tag:?}, expected {VERSION}"
    );
    ensure!(
        *tagged.media_type() == MediaType::ImageIndex,
        "the tag points to a {}, expected an image index",
        tagged.media_type()
    );
    let index: ImageIndex = serde_json::from_slice(&read_blob(root, tagged)?)?;
    let mut platforms = BTreeSet::new();
    let mut blobs_used = BTreeSet::from([tagged.digest().to_string()]);
    for m in index.manifests() {
        let p = m
            .platform()
            .as_ref()
            .with_context(|| format!("manifest {} has no platform", m.digest()))?;
        let arch = Arch::ALL
            .into_iter()
            .find(|a| oci_arch(*a) == *p.architecture())
            .with_context(|| format!("unexpected platform {}", p.architecture()))?;
        ensure!(*p.os() == Os::Linux, "platform os {}", p.os());
        ensure!(
            platforms.insert(arch.name()),
            "two manifests for {}",
            arch.name()
        );
        ensure!(
            *m.media_type() == MediaType::ImageManifest,
            "{}: {}",
            m.digest(),
            m.media_type()
        );
        blobs_used.insert(m.digest().to_string());
        let manifest: ImageManifest = serde_json::from_slice(&read_blob(root, m)?)?;
        ensure!(
            *manifest.config().media_type() == MediaType::ImageConfig,
            "config media type {}",
            manifest.config().media_type()
        );
        blobs_used.insert(manifest.config().digest().to_string());
        let config: ImageConfiguration =
            serde_json::from_slice(&read_blob(root, manifest.config())?)?;
        ensure!(
            *config.architecture() == *p.architecture() && *config.os() == Os::Linux,
            "{}: the configuration says {}/{}",
            arch.name(),
            config.os(),
            config.architecture()
        );
        let run = config
            .config()
            .as_ref()
            .context("the image has no run configuration")?;
        ensure!(
            run.entrypoint().as_deref() == Some(&[ENTRYPOINT.to_string()][..]),
            "{}: entrypoint {:?}, expected [{ENTRYPOINT:?}]",
            arch.name(),
            run.entrypoint()
        );
        let user = run.user().clone().unwrap_or_default();
        ensure!(
            runs_as_root(&user),
            "{}: runs as {user:?}, not root",
            arch.name()
        );
        ensure!(
            run.cmd()
                .as_deref()
                .map(|c| c.iter().map(String::as_str).collect::<Vec<_>>())
                == Some(CMD.to_vec()),
            "{}: cmd {:?}",
            arch.name(),
            run.cmd()
        );
        let diff_ids = config.rootfs().diff_ids();
        ensure!(
            diff_ids.len() == manifest.layers().len(),
            "{} diff_ids for {} layers",
            diff_ids.len(),
            manifest.layers().len()
        );
        let mut files = dist::TarFiles::new();
        for (l, diff_id) in manifest.layers().iter().zip(diff_ids) {
            ensure!(
                *l.media_type() == MediaType::ImageLayerGzip,
                "layer media type {}",
                l.media_type()
            );
            blobs_used.insert(l.digest().to_string());
            let tar = gunzip(&read_blob(root, l)?)?;
            ensure!(
                *diff_id == format!("sha256:{}", sha256_hex(&tar)),
                "{}: diff_id {diff_id} is not the uncompressed layer's digest",
                arch.name()
            );
            files.extend(read_tar(&tar)?);
        }
        let entry = ENTRYPOINT.trim_start_matches('/');
        let (mode, binary) = files
            .get(entry)
            .with_context(|| format!("{}: no {ENTRYPOINT} in the layers", arch.name()))?;
        ensure!(mode & 0o111 == 0o111, "{ENTRYPOINT} is not executable");
        let binary = binary.as_ref().context("the entrypoint is not a file")?;
        Elf::parse(binary)?.expect_machine(arch)?;
        let artifact = dist
            .artifact(arch)
            .with_context(|| format!("no {} tarball", arch.name()))?;
        ensure!(
            *binary == tarball_binary(artifact)?,
            "{}: the image's tracer is not the tarball's",
            arch.name()
        );
    }
    let expected: BTreeSet<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
    ensure!(
        platforms == expected,
        "the image has platforms {platforms:?}, expected {expected:?}"
    );
    // Nothing stored that the index does not reach.
    let stored: BTreeSet<String> = fs::read_dir(root.join("blobs/sha256"))?
        .flatten()
        .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
        .collect();
    ensure!(
        stored == blobs_used,
        "blobs stored {stored:?}, referenced {blobs_used:?}"
    );

    let repo = workspace_root();
    let read = |p: &str| fs::read_to_string(repo.join(p)).with_context(|| format!("reading {p}"));
    check_dockerfile(&read(DOCKERFILE)?)?;
    check_daemonset(
        &read(MANIFEST)?,
        &read(crate::deploy::PRIVILEGES_DOC)?,
        &read("deploy/systemd/tracer.service")?,
    )?;
    eprintln!(
        "xtask: {}: linux/amd64 and linux/arm64, digests match, entrypoint {ENTRYPOINT} as root, the binaries of the tarballs; the Dockerfile and the DaemonSet agree",
        root.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_296_871), "2026-12-03T11:21:11Z");
    }

    #[test]
    fn the_dockerfile_builds_this_image() {
        let text = fs::read_to_string(workspace_root().join(DOCKERFILE)).unwrap();
        check_dockerfile(&text).unwrap();
        for (from, to) in [
            ("FROM scratch\n", "FROM debian:bookworm-slim\n"),
            ("USER 0:0", "USER 65534"),
            ("\"--events\", \"none\"", "\"--events\", \"all\""),
            (
                "ENTRYPOINT [\"/usr/local/bin/tracer\"]",
                "ENTRYPOINT [\"/tracer\"]",
            ),
        ] {
            assert!(text.contains(from), "{from:?}");
            assert!(
                check_dockerfile(&text.replacen(from, to, 1)).is_err(),
                "{to:?}"
            );
        }
    }

    #[test]
    fn the_daemonset_runs_this_image_as_root() {
        let repo = workspace_root();
        let read = |p: &str| fs::read_to_string(repo.join(p)).unwrap();
        let (manifest, doc, unit) = (
            read(MANIFEST),
            read(crate::deploy::PRIVILEGES_DOC),
            read("deploy/systemd/tracer.service"),
        );
        check_daemonset(&manifest, &doc, &unit).unwrap();
        let tag = format!("tracer:{VERSION}");
        assert!(manifest.contains(&tag));
        assert!(check_daemonset(&manifest.replace(&tag, "tracer:0.0.1"), &doc, &unit).is_err());
        assert!(check_daemonset(
            &manifest.replace("runAsUser: 0", "runAsUser: 1000"),
            &doc,
            &unit
        )
        .is_err());
    }

    #[test]
    fn root_is_uid_0() {
        assert!(runs_as_root("0:0") && runs_as_root("") && runs_as_root("root"));
        assert!(!runs_as_root("65534") && !runs_as_root("nobody:0"));
    }
}
