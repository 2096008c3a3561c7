//! Just enough of an ELF reader to check release binaries without `file`
//! (which the machine may not have): the architecture, whether a dynamic
//! loader is named (`PT_INTERP`), whether libraries are needed
//! (`DT_NEEDED`), and whether symbols or debug info are left (`.symtab`,
//! `.debug_*` sections). 64-bit little-endian only: both architectures
//! the tracer ships for.

use std::path::Path;

use anyhow::{bail, ensure, Context as _, Result};

use crate::vm::Arch;

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;
const SHT_SYMTAB: u32 = 2;

#[derive(Debug)]
pub(crate) struct Elf {
    pub machine: u16,
    /// The dynamic loader it asks for, if any.
    pub interpreter: Option<String>,
    /// Number of `DT_NEEDED` entries (shared libraries it needs).
    pub needed: usize,
    /// A symbol table is present (not stripped).
    pub symtab: bool,
    /// Names of `.debug_*` sections.
    pub debug_sections: Vec<String>,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    let s = b.get(at..at + 2).context("ELF truncated")?;
    Ok(u16::from_le_bytes(s.try_into().expect("2 bytes")))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    let s = b.get(at..at + 4).context("ELF truncated")?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    let s = b.get(at..at + 8).context("ELF truncated")?;
    Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn usize_at(b: &[u8], at: usize) -> Result<usize> {
    usize::try_from(u64_at(b, at)?).context("ELF offset too large")
}

impl Elf {
    pub(crate) fn read(path: &Path) -> Result<Elf> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Elf::parse(&bytes).with_context(|| format!("{} as ELF", path.display()))
    }

    pub(crate) fn parse(b: &[u8]) -> Result<Elf> {
        ensure!(b.get(..4) == Some(b"\x7fELF"), "not an ELF file");
        ensure!(b.get(4) == Some(&2), "not a 64-bit ELF file");
        ensure!(b.get(5) == Some(&1), "not a little-endian ELF file");
        let machine = u16_at(b, 18)?;
        let phoff = usize_at(b, 32)?;
        let phentsize = usize::from(u16_at(b, 54)?);
        let phnum = usize::from(u16_at(b, 56)?);

        let mut interpreter = None;
        let mut needed = 0;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            let p_type = u32_at(b, ph)?;
            let offset = usize_at(b, ph + 8)?;
            let filesz = usize_at(b, ph + 32)?;
            let data = b
                .get(offset..offset + filesz)
                .context("segment outside the file")?;
            match p_type {
                PT_INTERP => {
                    let name = data.split(|&c| c == 0).next().unwrap_or_default();
                    interpreter = Some(String::from_utf8_lossy(name).into_owned());
                }
                PT_DYNAMIC => {
                    // Elf64_Dyn: d_tag, d_val, 8 bytes each; DT_NULL ends.
                    for entry in data.chunks_exact(16) {
                        let tag = u64_at(entry, 0)?;
                        if tag == 0 {
                            break;
                        }
                        if tag == DT_NEEDED {
                            needed += 1;
                        }
                    }
                }
                _ => {}
            }
        }

        let mut symtab = false;
        let mut debug_sections = Vec::new();
        for (name, sh_type, _) in sections(b)? {
            if sh_type == SHT_SYMTAB {
                symtab = true;
            }
            if name.starts_with(".debug_") {
                debug_sections.push(name);
            }
        }
        Ok(Elf {
            machine,
            interpreter,
            needed,
            symtab,
            debug_sections,
        })
    }

    pub(crate) fn expect_machine(&self, arch: Arch) -> Result<()> {
        if self.machine != arch.elf_machine() {
            bail!(
                "built for ELF machine {}, not {} ({})",
                self.machine,
                arch.elf_machine(),
                arch.name()
            );
        }
        Ok(())
    }

    /// Runs on any Linux of its architecture as it is: no loader, no
    /// shared library.
    pub(crate) fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.needed == 0
    }

    pub(crate) fn is_stripped(&self) -> bool {
        !self.symtab && self.debug_sections.is_empty()
    }
}

/// The sections of an ELF file: (name, type, contents; empty for
/// `SHT_NOBITS`).
pub(crate) fn sections(b: &[u8]) -> Result<Vec<(String, u32, &[u8])>> {
    const SHT_NOBITS: u32 = 8;
    ensure!(b.get(..4) == Some(b"\x7fELF"), "not an ELF file");
    let shoff = usize_at(b, 40)?;
    let shentsize = usize::from(u16_at(b, 58)?);
    let shnum = usize::from(u16_at(b, 60)?);
    let shstrndx = usize::from(u16_at(b, 62)?);
    if shnum == 0 || shoff == 0 {
        return Ok(Vec::new());
    }
    let section = |i: usize| shoff + i * shentsize;
    let strtab_off = usize_at(b, section(shstrndx) + 24)?;
    let mut out = Vec::new();
    for i in 0..shnum {
        let sh = section(i);
        let name_off = u32_at(b, sh)? as usize;
        let sh_type = u32_at(b, sh + 4)?;
        let offset = usize_at(b, sh + 24)?;
        let size = usize_at(b, sh + 32)?;
        let name = b
            .get(strtab_off + name_off..)
            .and_then(|s| s.split(|&c| c == 0).next())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        let data = if sh_type == SHT_NOBITS {
            &[][..]
        } else {
            b.get(offset..offset + size)
                .with_context(|| format!("section {name} outside the file"))?
        };
        out.push((name, sh_type, data));
    }
    Ok(out)
}

/// The sections of an eBPF object that describe rather than make up the
/// program: DWARF and BTF (names, types, line info) and their relocations.
pub(crate) fn is_description(section: &str) -> bool {
    let s = section.strip_prefix(".rel").unwrap_or(section);
    s.starts_with(".debug_") || s.starts_with(".BTF")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's own xtask: dynamically linked against glibc.
    #[test]
    fn a_dynamic_executable_names_its_loader() {
        let me = std::env::current_exe().unwrap();
        let elf = Elf::read(&me).unwrap();
        elf.expect_machine(Arch::host()).unwrap();
        assert!(!elf.is_static(), "{elf:?}");
        assert!(elf.interpreter.unwrap().contains("ld-linux"));
        assert!(elf.needed > 0);
    }

    #[test]
    fn other_files_are_refused() {
        assert!(Elf::parse(b"#!/bin/sh\n").is_err());
        assert!(Elf::parse(b"\x7fELF\x01\x01").is_err());
        // A header that points past its end.
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[32] = 200; // e_phoff
        b[54] = 56; // e_phentsize
        b[56] = 1; // e_phnum
        assert!(Elf::parse(&b).is_err());
    }
}
