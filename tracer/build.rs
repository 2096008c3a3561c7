//! Builds the kernel program (`tracer-ebpf`) for the BPF target with
//! aya-build (nightly, `-Z build-std=core`, bpf-linker) and leaves the object
//! in `OUT_DIR`, where `loader.rs` embeds it with `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // The workspace's release profile links the agent with fat LTO; the
    // kernel program's crates are linked by bpf-linker, and its object
    // stays the one the kernels' verifiers were tested with. Cargo takes
    // profile settings from the environment, which the nested build
    // inherits.
    std::env::set_var("CARGO_PROFILE_RELEASE_LTO", "false");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
