//! Artifact packing: a reproducible tar of workspace paths, compressed with zstd and named by the
//! SHA-256 of the uncompressed tar stream; plus the receiving side's streaming verification and the
//! deployment side's extraction. It never follows a symlink while packing, never packs a symlink
//! that leads out of the workspace, and never writes outside the destination directory when unpacking.
//!
//! Data flow of `pack`: the calling thread walks the plan in path order and writes tar bytes straight
//! into 1 MiB chunks (file contents are read from the kernel directly into the chunk, so each byte is
//! copied once in user space); each full chunk is shared through an `Arc` with a hashing thread and a
//! compressing thread, whose zstd encoder runs its own worker pool. Bounded queues between them keep
//! memory at a few MiB whatever the artifact size.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedArtifact {
    pub path: PathBuf,
    /// Lower-case hex SHA-256 of the uncompressed tar stream.
    pub digest: String,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PackError(pub String);

/// zstd level 3: zstd's default, the best speed/ratio trade for build outputs.
const ZSTD_LEVEL: i32 = 3;
/// Size of the buffers handed from the tar writer to the hashing and compressing threads.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks that may wait in each queue; bounds memory to roughly `2 * QUEUED_CHUNKS` MiB plus zstd's own.
const QUEUED_CHUNKS: usize = 8;
const TAR_BLOCK: usize = 512;
/// Length of the name and linkname fields of a tar header; longer names use GNU long-name entries.
const TAR_NAME_FIELD: usize = 100;
/// The kernel's limit on symlinks followed while resolving one path (`MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: usize = 40;

/// Packs `paths` (relative to `workspace`; files or directories, recursively; `"."` is the whole
/// workspace) into the zstd-compressed tar file `dest`. Blocking: call it from `spawn_blocking`.
///
/// The tar is reproducible: entries are sorted by path, mtime, uid and gid are 0, user and group
/// names are empty, and only the permission bits of the mode are kept, so the same tree gives the
/// same digest on every run and host. The file is written beside `dest`, fsynced and renamed into
/// place, so `dest` never holds a partial artifact.
pub fn pack(workspace: &Path, paths: &[String], dest: &Path) -> Result<PackedArtifact, PackError> {
    let workspace = canonical_workspace(workspace)?;
    let output = OutputFile::prepare(dest)?;
    let plan = plan_entries(&workspace, paths, &output.paths_to_skip())?;
    output.write(|stream| write_plan(stream, &plan))
}

/// The digest and length of the tar stream [`pack`] makes of `paths`, without compressing or
/// writing anything: the first pass of an upload, so that the coordinator can be asked whether it
/// already has the artifact before a byte is compressed. Blocking.
pub fn digest(workspace: &Path, paths: &[String]) -> Result<(String, u64), PackError> {
    let workspace = canonical_workspace(workspace)?;
    let plan = plan_entries(&workspace, paths, &[])?;
    let mut stream = ChunkStream::hash_only()?;
    write_plan(&mut stream, &plan)?;
    let (digest, length, _) = stream.finish()?;
    Ok((digest.expect("a hashing stream returns its digest"), length))
}

/// Packs `paths` like [`pack`] but writes the compressed stream into `output` (for example an
/// upload in progress) instead of a file, without hashing it again: the digest comes from
/// [`digest`] and whoever receives the stream verifies it (the coordinator does). Returns the
/// length of the tar stream and the output. Blocking.
pub fn pack_into<W: Write + Send + 'static>(workspace: &Path, paths: &[String], output: W) -> Result<(u64, W), PackError> {
    let workspace = canonical_workspace(workspace)?;
    let plan = plan_entries(&workspace, paths, &[])?;
    let mut stream = ChunkStream::compress_only(output)?;
    write_plan(&mut stream, &plan)?;
    let (_, length, output) = stream.finish()?;
    Ok((length, output.expect("a compressing stream returns its output")))
}

fn canonical_workspace(workspace: &Path) -> Result<PathBuf, PackError> {
    fs::canonicalize(workspace).map_err(|error| PackError(format!("workspace {} cannot be opened: {error}", workspace.display())))
}

fn write_plan<W: Write + Send + 'static>(stream: &mut ChunkStream<W>, plan: &Plan) -> Result<(), PackError> {
    for (archive_path, entry) in plan {
        write_entry(stream, archive_path, entry)?;
    }
    // A tar ends with two zero blocks.
    stream.write_bytes(&[0; 2 * TAR_BLOCK])
}

/// Compresses an existing tar file (for example a `docker save` export) into `dest`; the digest is
/// the SHA-256 of the tar file's bytes, so it matches what `pack` would report for the same stream.
pub fn pack_tar_file(tar: &Path, dest: &Path) -> Result<PackedArtifact, PackError> {
    let mut source = File::open(tar).map_err(|error| PackError(format!("tar file {} cannot be opened: {error}", tar.display())))?;
    let output = OutputFile::prepare(dest)?;
    output.write(|stream| stream.copy_to_end(&mut source, &tar.display().to_string()))
}

/// Incremental verification on the receiving side: feed the `.tar.zst` bytes as they arrive, in
/// pieces of any size, then `finish` gives the SHA-256 and length of the decompressed tar. Memory
/// stays bounded by zstd's window limit (at most 128 MiB, 2 MiB for archives made by `pack`) plus
/// a few pieces queued for hashing. Decompression runs in the caller's thread and SHA-256 on a
/// thread of its own, so that verifying a large upload uses two cores: hashing costs more than
/// decompressing, and alone on one core it would make the receiver slower than the sender.
pub struct Verifier {
    decoder: Option<zstd::stream::write::Decoder<'static, HashingThread>>,
    compressed_bytes: u64,
    failed: bool,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        // The decoder (and its hashing thread) start on the first piece, so that `new` cannot fail.
        Verifier { decoder: None, compressed_bytes: 0, failed: false }
    }

    pub fn update(&mut self, compressed: &[u8]) -> Result<(), PackError> {
        if self.failed {
            return Err(PackError("artifact stream already failed verification; start again with a new Verifier".to_string()));
        }
        let decoder = match &mut self.decoder {
            Some(decoder) => decoder,
            None => {
                let hashing = HashingThread::start().map_err(|error| PackError(format!("cannot start the hashing thread: {error}")))?;
                let decoder = zstd::stream::write::Decoder::new(hashing)
                    .map_err(|error| PackError(format!("cannot start zstd decompression: {error}")))?;
                self.decoder.insert(decoder)
            }
        };
        if let Err(error) = decoder.write_all(compressed) {
            self.failed = true;
            return Err(PackError(format!(
                "artifact stream is corrupt (not valid zstd) within the {} bytes after byte {}: {error}",
                compressed.len(),
                self.compressed_bytes
            )));
        }
        self.compressed_bytes += compressed.len() as u64;
        Ok(())
    }

    /// Returns (lower-case hex SHA-256 of the decompressed bytes, decompressed length).
    pub fn finish(self) -> Result<(String, u64), PackError> {
        if self.failed {
            return Err(PackError("artifact stream failed verification".to_string()));
        }
        let Some(decoder) = self.decoder else {
            return Err(PackError("artifact stream is empty; the upload sent no bytes".to_string()));
        };
        let hashing = decoder.finish().map_err(|error| {
            PackError(format!("artifact stream is truncated or corrupt after {} compressed bytes: {error}", self.compressed_bytes))
        })?;
        hashing.finish()
    }
}

/// A writer that collects decompressed bytes into chunks and hashes them on its own thread.
/// Dropped unfinished (a failed verification), it closes the queue and the thread ends.
struct HashingThread {
    chunk: Vec<u8>,
    to_hasher: Option<SyncSender<Vec<u8>>>,
    hasher: Option<JoinHandle<(String, u64)>>,
}

impl HashingThread {
    fn start() -> io::Result<HashingThread> {
        let (to_hasher, chunks) = mpsc::sync_channel::<Vec<u8>>(QUEUED_CHUNKS);
        let hasher = thread::Builder::new().name("davit-verify-sha256".to_string()).spawn(move || {
            let mut hasher = Sha256::new();
            let mut bytes = 0u64;
            for chunk in chunks {
                hasher.update(&chunk);
                bytes += chunk.len() as u64;
            }
            (hex::encode(hasher.finalize()), bytes)
        })?;
        Ok(HashingThread { chunk: Vec::with_capacity(CHUNK_BYTES), to_hasher: Some(to_hasher), hasher: Some(hasher) })
    }

    fn send_chunk(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_BYTES));
        let sent = self.to_hasher.as_ref().is_some_and(|to_hasher| to_hasher.send(chunk).is_ok());
        if sent { Ok(()) } else { Err(io::Error::other("the hashing thread stopped")) }
    }

    fn finish(mut self) -> Result<(String, u64), PackError> {
        self.send_chunk().map_err(|error| PackError(error.to_string()))?;
        self.to_hasher = None;
        let hasher = self.hasher.take().expect("joined once");
        hasher.join().map_err(|_| PackError("the hashing thread panicked".to_string()))
    }
}

impl Write for HashingThread {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let taken = buffer.len().min(CHUNK_BYTES - self.chunk.len());
        self.chunk.extend_from_slice(&buffer[..taken]);
        if self.chunk.len() == CHUNK_BYTES {
            self.send_chunk()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for HashingThread {
    fn drop(&mut self) {
        self.to_hasher = None;
        if let Some(hasher) = self.hasher.take() {
            let _ = hasher.join();
        }
    }
}

/// Extracts a `.tar.zst` made by `pack` into `dest_dir` (created if missing). Refuses, rather than
/// skips, entries with absolute paths or `..`, symlinks and hard links leading outside `dest_dir`,
/// and device or FIFO entries. Permission bits are restored (setuid/setgid dropped); mtimes are the
/// time of extraction.
pub fn unpack(archive: &Path, dest_dir: &Path) -> Result<(), PackError> {
    let shown_archive = archive.display().to_string();
    let file = File::open(archive).map_err(|error| PackError(format!("artifact {shown_archive} cannot be opened: {error}")))?;
    let decoder = zstd::stream::read::Decoder::new(file)
        .map_err(|error| PackError(format!("cannot start zstd decompression for {shown_archive}: {error}")))?;
    fs::create_dir_all(dest_dir).map_err(|error| PackError(format!("cannot create unpack directory {}: {error}", dest_dir.display())))?;
    let dest_dir =
        fs::canonicalize(dest_dir).map_err(|error| PackError(format!("cannot open unpack directory {}: {error}", dest_dir.display())))?;

    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_mtime(false);
    tar.set_preserve_permissions(false);
    tar.set_preserve_ownerships(false);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(true);

    let read_error = |error: io::Error| PackError(format!("artifact {shown_archive} is not a valid .tar.zst: {error}"));
    // Directories are applied last, deepest first, so that a read-only directory does not stop its
    // own contents from being written (the tar crate's `Archive::unpack` does the same).
    let mut directories = Vec::new();
    for entry in tar.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        let path = entry.path().map_err(read_error)?.into_owned();
        let shown = path.display().to_string();
        let parent_depth = check_relative_path(&path).map_err(|reason| {
            PackError(format!("artifact {shown_archive} holds the entry '{shown}', which {reason}; refusing to unpack"))
        })?;
        let entry_type = entry.header().entry_type();
        match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Directory => {
                directories.push(entry);
                continue;
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry.link_name().map_err(read_error)?.map(|target| target.into_owned()).unwrap_or_default();
                let escapes = if entry_type == tar::EntryType::Symlink {
                    // A symlink target is relative to the link's own directory.
                    relative_target_escapes(parent_depth.saturating_sub(1), &target)
                } else {
                    // A hard link target is relative to the archive root.
                    target.as_os_str().is_empty() || check_relative_path(&target).is_err()
                };
                if escapes {
                    return Err(PackError(format!(
                        "artifact {shown_archive} holds the link '{shown}' -> '{}', which leads outside the unpack directory; refusing to unpack",
                        target.display()
                    )));
                }
            }
            tar::EntryType::XGlobalHeader => continue,
            other => {
                return Err(PackError(format!(
                    "artifact {shown_archive} holds the entry '{shown}' of unsupported type {other:?}; only files, directories and links are unpacked"
                )));
            }
        }
        unpack_entry(&mut entry, &dest_dir, &shown)?;
    }
    directories.sort_by(|left, right| right.path_bytes().cmp(&left.path_bytes()));
    for mut directory in directories {
        let shown = String::from_utf8_lossy(&directory.path_bytes()).into_owned();
        unpack_entry(&mut directory, &dest_dir, &shown)?;
    }
    Ok(())
}

fn unpack_entry<R: Read>(entry: &mut tar::Entry<'_, R>, dest_dir: &Path, shown: &str) -> Result<(), PackError> {
    match entry.unpack_in(dest_dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(PackError(format!("entry '{shown}' would be written outside {}; refusing to unpack", dest_dir.display()))),
        Err(error) => Err(PackError(format!("cannot unpack '{shown}' into {}: {error}", dest_dir.display()))),
    }
}

/// Checks that `path` is relative and has no `..`; returns its number of normal components.
fn check_relative_path(path: &Path) -> Result<usize, &'static str> {
    let mut depth = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => return Err("contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    Ok(depth)
}

/// Whether `target`, read from a directory `depth` levels below the root, leaves the root lexically.
fn relative_target_escapes(depth: usize, target: &Path) -> bool {
    if target.as_os_str().is_empty() {
        return true;
    }
    let mut depth = depth;
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(parent) => depth = parent,
                None => return true,
            },
            Component::RootDir | Component::Prefix(_) => return true,
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Planning: which entries go into the tar, validated and sorted before a byte is written.

enum PlannedKind {
    Directory { mode: u32 },
    File,
    Symlink { target: Vec<u8> },
}

struct PlannedEntry {
    source: PathBuf,
    kind: PlannedKind,
}

/// Entries keyed by their path in the archive (no trailing slash); the map's byte order is the
/// archive order, and a directory always sorts before its contents because its path is a prefix.
type Plan = BTreeMap<Vec<u8>, PlannedEntry>;

fn plan_entries(workspace: &Path, paths: &[String], skip: &[PathBuf]) -> Result<Plan, PackError> {
    let mut plan = Plan::new();
    for requested in paths {
        let parts = requested_components(requested)?;
        let source: PathBuf = parts.iter().fold(workspace.to_path_buf(), |path, part| path.join(part));
        if parts.len() > 1 {
            // The last component is examined without following it; everything above it must
            // resolve inside the workspace, or a symlinked directory could smuggle in outside files.
            let parent = source.parent().unwrap_or(workspace);
            match fs::canonicalize(parent) {
                Ok(parent) if parent.starts_with(workspace) => {}
                Ok(_) => {
                    return Err(PackError(format!("artifact path '{requested}' goes through a symlink that leads outside the workspace")));
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(missing_path(requested)),
                Err(error) => return Err(PackError(format!("artifact path '{requested}' cannot be read: {error}"))),
            }
        }
        let metadata = match fs::symlink_metadata(&source) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(missing_path(requested)),
            Err(error) => return Err(PackError(format!("artifact path '{requested}' cannot be read: {error}"))),
        };
        let archive_path = parts.iter().map(|part| part.as_bytes()).collect::<Vec<_>>().join(&b'/');
        add_tree(&mut plan, workspace, archive_path, source, metadata.file_type(), skip)?;
    }
    Ok(plan)
}

fn missing_path(requested: &str) -> PackError {
    PackError(format!("artifact path '{requested}' does not exist in the workspace"))
}

/// Splits a requested path into its normal components, refusing absolute paths and `..`.
fn requested_components(requested: &str) -> Result<Vec<&OsStr>, PackError> {
    if requested.is_empty() {
        return Err(PackError("artifact path must not be empty; use \".\" for the whole workspace".to_string()));
    }
    let mut parts = Vec::new();
    for component in Path::new(requested).components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(PackError(format!("artifact path '{requested}' contains '..'; artifact paths must stay inside the workspace")));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(PackError(format!("artifact path '{requested}' is absolute; give a path relative to the workspace")));
            }
        }
    }
    Ok(parts)
}

/// Adds `source` and, for a directory, everything below it, never following symlinks. An empty
/// `archive_path` is the workspace root itself, which gets no entry of its own.
fn add_tree(
    plan: &mut Plan,
    workspace: &Path,
    archive_path: Vec<u8>,
    source: PathBuf,
    file_type: fs::FileType,
    skip: &[PathBuf],
) -> Result<(), PackError> {
    let mut pending = vec![(archive_path, source, file_type)];
    while let Some((archive_path, source, file_type)) = pending.pop() {
        if skip.contains(&source) || (!archive_path.is_empty() && plan.contains_key(&archive_path)) {
            continue;
        }
        let shown = String::from_utf8_lossy(&archive_path).into_owned();
        let read_error = |error: io::Error| PackError(format!("cannot read '{shown}' in the workspace: {error}"));
        if file_type.is_dir() {
            if !archive_path.is_empty() {
                let mode = fs::symlink_metadata(&source).map_err(read_error)?.permissions().mode() & 0o7777;
                plan.insert(archive_path.clone(), PlannedEntry { source: source.clone(), kind: PlannedKind::Directory { mode } });
            }
            for child in fs::read_dir(&source).map_err(read_error)? {
                let child = child.map_err(read_error)?;
                let mut child_path = archive_path.clone();
                if !child_path.is_empty() {
                    child_path.push(b'/');
                }
                child_path.extend_from_slice(child.file_name().as_bytes());
                pending.push((child_path, child.path(), child.file_type().map_err(read_error)?));
            }
        } else if file_type.is_file() {
            plan.insert(archive_path, PlannedEntry { source, kind: PlannedKind::File });
        } else if file_type.is_symlink() {
            let target = fs::read_link(&source).map_err(read_error)?;
            check_symlink(workspace, &archive_path, &target)?;
            let target = target.into_os_string().into_vec();
            plan.insert(archive_path, PlannedEntry { source, kind: PlannedKind::Symlink { target } });
        } else {
            return Err(PackError(format!(
                "'{shown}' is a socket, FIFO or device file; only regular files, directories and symlinks can be packed"
            )));
        }
    }
    Ok(())
}

/// Refuses absolute symlinks (they would point elsewhere on the host that unpacks them) and
/// relative ones that resolve, through any chain of symlinks, to a place outside the workspace.
fn check_symlink(workspace: &Path, archive_path: &[u8], target: &Path) -> Result<(), PackError> {
    let shown = String::from_utf8_lossy(archive_path);
    if target.is_absolute() {
        return Err(PackError(format!(
            "symlink '{shown}' points to the absolute path '{}'; only relative symlinks that stay inside the workspace can be packed",
            target.display()
        )));
    }
    let link_directory = Path::new(OsStr::from_bytes(archive_path)).parent().unwrap_or(Path::new(""));
    let components = link_directory.components().chain(target.components()).map(|component| component.as_os_str().to_owned());
    if !resolves_inside(workspace, components.collect()) {
        return Err(PackError(format!(
            "symlink '{shown}' points to '{}', which is outside the workspace; only symlinks that stay inside the workspace can be packed",
            target.display()
        )));
    }
    Ok(())
}

/// Follows `components` from the workspace root as the kernel would, through symlinks, and tells
/// whether the result stays inside. Missing components are taken lexically, so a dangling link is
/// fine as long as it would land inside.
fn resolves_inside(workspace: &Path, components: VecDeque<OsString>) -> bool {
    let mut pending = components;
    let mut resolved = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            if !resolved.pop() {
                return false;
            }
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        resolved.push(&part);
        let current = workspace.join(&resolved);
        let Ok(metadata) = fs::symlink_metadata(&current) else { continue };
        if !metadata.file_type().is_symlink() {
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            // A loop never resolves, so it cannot reach outside either.
            return true;
        }
        let Ok(target) = fs::read_link(&current) else { return false };
        resolved.pop();
        if target.is_absolute() {
            // Only reachable through intermediate links, which live on this host's workspace.
            match target.strip_prefix(workspace) {
                Ok(inside) => {
                    resolved = PathBuf::new();
                    prepend(&mut pending, inside);
                }
                Err(_) => return false,
            }
        } else {
            prepend(&mut pending, &target);
        }
    }
    true
}

fn prepend(pending: &mut VecDeque<OsString>, path: &Path) {
    for component in path.components().rev() {
        pending.push_front(component.as_os_str().to_owned());
    }
}

// ---------------------------------------------------------------------------------------------
// Writing: tar headers and contents into chunks, hashed and compressed on other threads.

fn write_entry<W: Write + Send + 'static>(stream: &mut ChunkStream<W>, archive_path: &[u8], entry: &PlannedEntry) -> Result<(), PackError> {
    let shown = String::from_utf8_lossy(archive_path);
    match &entry.kind {
        PlannedKind::Directory { mode } => {
            let mut path = archive_path.to_vec();
            path.push(b'/');
            write_header(stream, tar::EntryType::Directory, &path, b"", *mode, 0)
        }
        PlannedKind::Symlink { target } => {
            // Symlink permissions mean nothing on Linux and differ on other systems: fix them.
            write_header(stream, tar::EntryType::Symlink, archive_path, target, 0o777, 0)
        }
        PlannedKind::File => {
            let mut file =
                File::open(&entry.source).map_err(|error| PackError(format!("cannot open '{shown}' in the workspace: {error}")))?;
            // Size and mode come from the opened file, so they describe the bytes that are read.
            let metadata = file.metadata().map_err(|error| PackError(format!("cannot read '{shown}' in the workspace: {error}")))?;
            if !metadata.is_file() {
                return Err(PackError(format!("'{shown}' changed from a regular file to something else while packing")));
            }
            let size = metadata.len();
            write_header(stream, tar::EntryType::Regular, archive_path, b"", metadata.mode() & 0o7777, size)?;
            stream.copy_exact(&mut file, size, &shown)?;
            stream.write_padding(size)
        }
    }
}

fn write_header<W: Write + Send + 'static>(
    stream: &mut ChunkStream<W>,
    entry_type: tar::EntryType,
    path: &[u8],
    link_target: &[u8],
    mode: u32,
    size: u64,
) -> Result<(), PackError> {
    if path.len() > TAR_NAME_FIELD {
        write_long_name(stream, tar::EntryType::GNULongName, path)?;
    }
    if link_target.len() > TAR_NAME_FIELD {
        write_long_name(stream, tar::EntryType::GNULongLink, link_target)?;
    }
    let mut header = tar::Header::new_gnu();
    copy_truncated(&mut header.as_old_mut().name, path);
    copy_truncated(&mut header.as_old_mut().linkname, link_target);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header.set_entry_type(entry_type);
    header.set_cksum();
    stream.write_bytes(header.as_bytes())
}

/// A GNU long-name (or long-link) entry: a pseudo-file whose contents are the NUL-terminated name of
/// the entry that follows. Written the way GNU tar and the tar crate write it.
fn write_long_name<W: Write + Send + 'static>(
    stream: &mut ChunkStream<W>,
    entry_type: tar::EntryType,
    name: &[u8],
) -> Result<(), PackError> {
    let mut header = tar::Header::new_gnu();
    copy_truncated(&mut header.as_old_mut().name, b"././@LongLink");
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    let size = name.len() as u64 + 1;
    header.set_size(size);
    header.set_entry_type(entry_type);
    header.set_cksum();
    stream.write_bytes(header.as_bytes())?;
    stream.write_bytes(name)?;
    stream.write_bytes(&[0])?;
    stream.write_padding(size)
}

fn copy_truncated(field: &mut [u8], value: &[u8]) {
    let length = value.len().min(field.len());
    field[..length].copy_from_slice(&value[..length]);
}

/// The artifact file being written: a temporary file beside `dest`, renamed into place once
/// complete and durable.
struct OutputFile {
    dest: PathBuf,
    temporary: PathBuf,
    directory: PathBuf,
}

impl OutputFile {
    fn prepare(dest: &Path) -> Result<OutputFile, PackError> {
        let Some(file_name) = dest.file_name() else {
            return Err(PackError(format!("artifact destination {} is not a file path", dest.display())));
        };
        let directory = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let directory = fs::canonicalize(directory)
            .map_err(|error| PackError(format!("artifact destination directory {} cannot be opened: {error}", directory.display())))?;
        let mut temporary_name = OsString::from(".");
        temporary_name.push(file_name);
        temporary_name.push(format!(".partial-{}", std::process::id()));
        Ok(OutputFile { dest: directory.join(file_name), temporary: directory.join(temporary_name), directory })
    }

    /// Paths that must not be packed even when they lie in the workspace: the artifact itself.
    fn paths_to_skip(&self) -> Vec<PathBuf> {
        vec![self.dest.clone(), self.temporary.clone()]
    }

    fn write(self, produce: impl FnOnce(&mut ChunkStream<WritebackFile>) -> Result<(), PackError>) -> Result<PackedArtifact, PackError> {
        let file = File::create(&self.temporary)
            .map_err(|error| PackError(format!("cannot create artifact file {}: {error}", self.temporary.display())))?;
        let result = self.write_and_commit(file, produce);
        if result.is_err() {
            let _ = fs::remove_file(&self.temporary);
        }
        result
    }

    fn write_and_commit(
        &self,
        file: File,
        produce: impl FnOnce(&mut ChunkStream<WritebackFile>) -> Result<(), PackError>,
    ) -> Result<PackedArtifact, PackError> {
        let mut stream = ChunkStream::start(WritebackFile::new(file))?;
        produce(&mut stream)?;
        let (digest, uncompressed_bytes, output) = stream.finish()?;
        let digest = digest.expect("a hashing stream returns its digest");
        let file = output.expect("a compressing stream returns its output").file;
        let write_error = |error: io::Error| PackError(format!("cannot write artifact file {}: {error}", self.dest.display()));
        file.sync_all().map_err(write_error)?;
        let compressed_bytes = file.metadata().map_err(write_error)?.len();
        drop(file);
        fs::rename(&self.temporary, &self.dest).map_err(write_error)?;
        // The rename is durable only once the directory itself is synced.
        File::open(&self.directory).and_then(|directory| directory.sync_all()).map_err(write_error)?;
        Ok(PackedArtifact { path: self.dest.clone(), digest, uncompressed_bytes, compressed_bytes })
    }
}

type Chunk = Arc<Vec<u8>>;

/// The writing end of the pipeline. Bytes go into `chunk` (always `CHUNK_BYTES` long; `filled`
/// says how much is data); a full chunk is shared with the hashing thread and, unless the stream
/// only hashes, the compressing thread, which writes zstd's output into a `W`.
struct ChunkStream<W> {
    chunk: Vec<u8>,
    filled: usize,
    /// Chunks sent recently, oldest first, so that their buffers can be reused once both threads
    /// have dropped them instead of allocating (and zeroing) a fresh megabyte per chunk.
    in_flight: VecDeque<Chunk>,
    to_hasher: Option<SyncSender<Chunk>>,
    to_compressor: Option<SyncSender<Chunk>>,
    hasher: Option<JoinHandle<String>>,
    compressor: Option<JoinHandle<io::Result<W>>>,
    /// Whether the stream hashes and whether it compresses (at least one of them).
    hashing: bool,
    compressing: bool,
    /// Tar bytes shipped so far.
    length: u64,
}

impl ChunkStream<io::Sink> {
    /// A stream that only hashes the tar bytes.
    fn hash_only() -> Result<Self, PackError> {
        Self::start_threads(true, None)
    }
}

impl<W: Write + Send + 'static> ChunkStream<W> {
    /// A stream that hashes the tar bytes and writes their zstd compression into `output`.
    fn start(output: W) -> Result<Self, PackError> {
        Self::start_threads(true, Some(output))
    }

    /// A stream that only compresses into `output` (its digest is known and checked elsewhere).
    fn compress_only(output: W) -> Result<Self, PackError> {
        Self::start_threads(false, Some(output))
    }

    fn start_threads(hashing: bool, output: Option<W>) -> Result<Self, PackError> {
        let workers = thread::available_parallelism().map(|count| count.get()).unwrap_or(1) as u32;
        let spawn_error = |error: io::Error| PackError(format!("cannot start a packing thread: {error}"));
        let (to_hasher, hasher) = if hashing {
            let (to_hasher, hasher_input) = mpsc::sync_channel(QUEUED_CHUNKS);
            let hasher = thread::Builder::new()
                .name("davit-pack-sha256".to_string())
                .spawn(move || hash_chunks(hasher_input))
                .map_err(spawn_error)?;
            (Some(to_hasher), Some(hasher))
        } else {
            (None, None)
        };
        let compressing = output.is_some();
        let (to_compressor, compressor) = match output {
            Some(output) => {
                let (to_compressor, compressor_input) = mpsc::sync_channel(QUEUED_CHUNKS);
                let compressor = thread::Builder::new()
                    .name("davit-pack-zstd".to_string())
                    .spawn(move || compress_chunks(compressor_input, output, workers))
                    .map_err(spawn_error)?;
                (Some(to_compressor), Some(compressor))
            }
            None => (None, None),
        };
        Ok(ChunkStream {
            chunk: vec![0; CHUNK_BYTES],
            filled: 0,
            in_flight: VecDeque::new(),
            to_hasher,
            to_compressor,
            hasher,
            compressor,
            hashing,
            compressing,
            length: 0,
        })
    }

    fn write_bytes(&mut self, mut bytes: &[u8]) -> Result<(), PackError> {
        while !bytes.is_empty() {
            let length = bytes.len().min(CHUNK_BYTES - self.filled);
            self.chunk[self.filled..self.filled + length].copy_from_slice(&bytes[..length]);
            self.filled += length;
            bytes = &bytes[length..];
            if self.filled == CHUNK_BYTES {
                self.ship()?;
            }
        }
        Ok(())
    }

    /// Zero bytes up to the next 512-byte boundary after `length` bytes of contents.
    fn write_padding(&mut self, length: u64) -> Result<(), PackError> {
        let remainder = (length % TAR_BLOCK as u64) as usize;
        if remainder == 0 { Ok(()) } else { self.write_bytes(&[0; TAR_BLOCK][remainder..]) }
    }

    /// Reads exactly `length` bytes of `file` straight into the chunks.
    fn copy_exact(&mut self, file: &mut File, length: u64, shown: &str) -> Result<(), PackError> {
        let mut remaining = length;
        while remaining > 0 {
            let read = self.fill_from(file, remaining, shown)?;
            if read == 0 {
                return Err(PackError(format!("'{shown}' shrank while it was being packed; make sure the job has finished writing it")));
            }
            remaining -= read as u64;
        }
        Ok(())
    }

    /// Reads `file` to its end straight into the chunks.
    fn copy_to_end(&mut self, file: &mut File, shown: &str) -> Result<(), PackError> {
        while self.fill_from(file, u64::MAX, shown)? > 0 {}
        Ok(())
    }

    fn fill_from(&mut self, file: &mut File, at_most: u64, shown: &str) -> Result<usize, PackError> {
        let space = (CHUNK_BYTES - self.filled).min(usize::try_from(at_most).unwrap_or(usize::MAX));
        let read = loop {
            match file.read(&mut self.chunk[self.filled..self.filled + space]) {
                Ok(read) => break read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(PackError(format!("cannot read '{shown}': {error}"))),
            }
        };
        self.filled += read;
        if self.filled == CHUNK_BYTES {
            self.ship()?;
        }
        Ok(read)
    }

    fn ship(&mut self) -> Result<(), PackError> {
        if self.filled == 0 {
            return Ok(());
        }
        let next = self.reusable_chunk();
        let mut chunk = std::mem::replace(&mut self.chunk, next);
        chunk.truncate(self.filled);
        self.filled = 0;
        let chunk = Arc::new(chunk);
        self.length += chunk.len() as u64;
        // A queue closed early means its thread stopped, which only the compressor does (on a
        // write error); a stream without a hasher or a compressor has no queue to begin with.
        let hashed = match &self.to_hasher {
            Some(to_hasher) => to_hasher.send(chunk.clone()).is_ok(),
            None => !self.hashing,
        };
        let compressed = match &self.to_compressor {
            Some(to_compressor) => to_compressor.send(chunk.clone()).is_ok(),
            None => !self.compressing,
        };
        let sent = hashed && compressed;
        if !sent {
            // A thread stopped early, which only the compressor does, on a write error: report it.
            return Err(self.stop().err().unwrap_or_else(|| PackError("artifact compression stopped unexpectedly".to_string())));
        }
        self.in_flight.push_back(chunk);
        if self.in_flight.len() > 2 * QUEUED_CHUNKS + 4 {
            self.in_flight.pop_front();
        }
        Ok(())
    }

    fn reusable_chunk(&mut self) -> Vec<u8> {
        if let Some(oldest) = self.in_flight.front()
            && Arc::strong_count(oldest) == 1
            && let Some(oldest) = self.in_flight.pop_front()
            && let Ok(mut buffer) = Arc::try_unwrap(oldest)
        {
            // Only the tail of the last, partly filled chunk is ever zeroed here.
            buffer.resize(CHUNK_BYTES, 0);
            return buffer;
        }
        vec![0; CHUNK_BYTES]
    }

    /// Ships the last chunk and waits for the threads; returns (digest, tar length, the
    /// compressor's output — `None` for a stream that only hashes).
    fn finish(mut self) -> Result<(Option<String>, u64, Option<W>), PackError> {
        self.ship()?;
        self.stop()
    }
}

impl<W> ChunkStream<W> {
    /// Closes the queues and waits for the threads, so that none outlives the call that started it.
    fn stop(&mut self) -> Result<(Option<String>, u64, Option<W>), PackError> {
        self.to_hasher = None;
        self.to_compressor = None;
        let hashed = self.hasher.take().map(JoinHandle::join);
        let output = match self.compressor.take().map(JoinHandle::join) {
            Some(Ok(Ok(output))) => Some(output),
            Some(Ok(Err(error))) => return Err(PackError(format!("cannot write the compressed artifact: {error}"))),
            Some(Err(_)) => return Err(PackError("the artifact compression thread panicked".to_string())),
            None if self.compressing => return Err(PackError("the artifact stream was already closed".to_string())),
            None => None,
        };
        match hashed {
            Some(Ok(digest)) => Ok((Some(digest), self.length, output)),
            Some(Err(_)) => Err(PackError("the artifact hashing thread panicked".to_string())),
            None if self.hashing => Err(PackError("the artifact stream was already closed".to_string())),
            None => Ok((None, self.length, output)),
        }
    }
}

impl<W> Drop for ChunkStream<W> {
    fn drop(&mut self) {
        if self.hasher.is_some() || self.compressor.is_some() {
            let _ = self.stop();
        }
    }
}

fn hash_chunks(chunks: Receiver<Chunk>) -> String {
    let mut hasher = Sha256::new();
    for chunk in chunks {
        hasher.update(chunk.as_slice());
    }
    hex::encode(hasher.finalize())
}

/// zstd's multithreaded mode compresses jobs of several MiB on its own worker pool; this thread
/// only feeds it and writes out what comes back. The frame carries a content checksum so that a
/// receiver detects corruption in the compressed bytes themselves.
fn compress_chunks<W: Write>(chunks: Receiver<Chunk>, output: W, workers: u32) -> io::Result<W> {
    let mut encoder = zstd::stream::write::Encoder::new(output, ZSTD_LEVEL)?;
    encoder.multithread(workers)?;
    encoder.include_checksum(true)?;
    for chunk in chunks {
        encoder.write_all(chunk.as_slice())?;
    }
    encoder.finish()
}

/// Starts the kernel's writeback of the artifact every few MiB while it is being written, so that
/// the final fsync waits only for the last few MiB instead of the whole file (the technique of
/// RocksDB's `bytes_per_sync`). The hint is advisory: if the kernel refuses it, writing goes on.
/// The coordinator writes received uploads through it too.
pub struct WritebackFile {
    file: File,
    written: u64,
    writeback_started_at: u64,
    writeback_works: bool,
}

/// How much is written between two writeback hints.
const WRITEBACK_BYTES: u64 = 8 << 20;

impl WritebackFile {
    pub fn new(file: File) -> WritebackFile {
        WritebackFile { file, written: 0, writeback_started_at: 0, writeback_works: true }
    }

    /// The file, for its final `sync_all`.
    pub fn into_file(self) -> File {
        self.file
    }
}

impl Write for WritebackFile {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let written = self.file.write(buffer)?;
        self.written += written as u64;
        let pending = self.written - self.writeback_started_at;
        if self.writeback_works && pending >= WRITEBACK_BYTES {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on a descriptor that `self.file` owns and keeps open; no
            // memory is shared with the kernel.
            let result = unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.writeback_started_at as libc::off64_t,
                    pending as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.writeback_works = result == 0;
            self.writeback_started_at = self.written;
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    use rand::{RngCore, SeedableRng};

    use super::*;

    fn write_file(root: &Path, relative: &str, contents: &[u8], mode: u32) {
        let path = root.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn random_bytes(seed: u64, length: usize) -> Vec<u8> {
        let mut bytes = vec![0; length];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
        bytes
    }

    const LONG_NAME: &str =
        "a-directory-name-that-is-long-enough/to-need-the-gnu-long-name-extension/because-tar-headers-hold-only/a-hundred-bytes.txt";

    /// A tree with every kind of entry `pack` supports, written in the given order (creation order
    /// must not matter). `big` is large enough to span several 1 MiB chunks.
    fn build_tree(root: &Path, reverse: bool) {
        let mut steps: Vec<fn(&Path)> = vec![
            |root| write_file(root, "dist/app", b"#!/bin/sh\necho hello\n", 0o755),
            |root| write_file(root, "dist/readme.txt", &b"hello artifact\n".repeat(1000), 0o644),
            |root| write_file(root, "dist/big.bin", &random_bytes(7, 3 * CHUNK_BYTES + 123), 0o644),
            |root| write_file(root, "dist/empty", b"", 0o600),
            |root| write_file(root, &format!("dist/{LONG_NAME}"), b"long", 0o644),
            |root| {
                fs::create_dir_all(root.join("dist/empty-dir")).unwrap();
            },
            |root| {
                fs::create_dir_all(root.join("dist/sub")).unwrap();
                symlink("../readme.txt", root.join("dist/sub/readme-link")).unwrap();
                symlink(format!("../{LONG_NAME}"), root.join("dist/sub/long-link")).unwrap();
            },
            |root| write_file(root, "notes.txt", b"not packed unless asked", 0o644),
        ];
        if reverse {
            steps.reverse();
        }
        for step in steps {
            step(root);
        }
    }

    fn pack_tree(root: &Path, paths: &[&str]) -> (tempfile::TempDir, PackedArtifact) {
        let out = tempfile::tempdir().unwrap();
        let paths: Vec<String> = paths.iter().map(|path| path.to_string()).collect();
        let packed = pack(root, &paths, &out.path().join("artifact.tar.zst")).unwrap();
        (out, packed)
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn decompressed(path: &Path) -> Vec<u8> {
        zstd::stream::decode_all(File::open(path).unwrap()).unwrap()
    }

    #[test]
    fn packing_is_reproducible_across_runs_mtimes_and_creation_order() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let (_out, first) = pack_tree(workspace.path(), &["dist"]);
        let (_out2, second) = pack_tree(workspace.path(), &["dist"]);
        assert_eq!(first.digest, second.digest);
        assert_eq!(first.uncompressed_bytes, second.uncompressed_bytes);

        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for file in ["dist/app", "dist/readme.txt", "dist/big.bin"] {
            File::options().write(true).open(workspace.path().join(file)).unwrap().set_modified(an_hour_ago).unwrap();
        }
        let (_out3, touched) = pack_tree(workspace.path(), &["dist"]);
        assert_eq!(first.digest, touched.digest);

        let elsewhere = tempfile::tempdir().unwrap();
        build_tree(elsewhere.path(), true);
        let (_out4, rebuilt) = pack_tree(elsewhere.path(), &["./dist/"]);
        assert_eq!(first.digest, rebuilt.digest);
    }

    #[test]
    fn a_changed_byte_or_mode_changes_the_digest() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let (_out, original) = pack_tree(workspace.path(), &["dist"]);

        let big = workspace.path().join("dist/big.bin");
        let mut bytes = fs::read(&big).unwrap();
        bytes[2 * CHUNK_BYTES] ^= 1;
        fs::write(&big, &bytes).unwrap();
        let (_out, changed_byte) = pack_tree(workspace.path(), &["dist"]);
        assert_ne!(original.digest, changed_byte.digest);
        bytes[2 * CHUNK_BYTES] ^= 1;
        fs::write(&big, &bytes).unwrap();
        let (_out, restored) = pack_tree(workspace.path(), &["dist"]);
        assert_eq!(original.digest, restored.digest);

        fs::set_permissions(workspace.path().join("dist/app"), fs::Permissions::from_mode(0o644)).unwrap();
        let (_out, changed_mode) = pack_tree(workspace.path(), &["dist"]);
        assert_ne!(original.digest, changed_mode.digest);
    }

    /// The two passes of an upload agree with `pack`: the digest pass gives pack's digest and
    /// length without compressing, and the streaming pass (which does not hash) writes a stream
    /// that decompresses to the same tar, as the receiving side's Verifier checks. A writer
    /// that fails stops it.
    #[test]
    fn digest_pass_and_streaming_pack_agree_with_pack() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let paths = ["dist".to_string(), "notes.txt".to_string()];
        let (_out, packed) = pack_tree(workspace.path(), &["dist", "notes.txt"]);
        assert_eq!(digest(workspace.path(), &paths).unwrap(), (packed.digest.clone(), packed.uncompressed_bytes));

        let (length, bytes) = pack_into(workspace.path(), &paths, Vec::new()).unwrap();
        assert_eq!(length, packed.uncompressed_bytes);
        let mut verifier = Verifier::new();
        for piece in bytes.chunks(4096) {
            verifier.update(piece).unwrap();
        }
        assert_eq!(verifier.finish().unwrap(), (packed.digest, packed.uncompressed_bytes));

        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let error = pack_into(workspace.path(), &paths, Broken).err().expect("a failing writer fails the pack");
        assert!(error.0.contains("gone"), "{error}");
        assert!(digest(workspace.path(), &["missing".to_string()]).is_err());
    }

    #[test]
    fn digest_and_sizes_describe_the_written_file() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let (_out, packed) = pack_tree(workspace.path(), &["dist", "notes.txt"]);
        let tar_bytes = decompressed(&packed.path);
        assert_eq!(packed.digest, sha256_hex(&tar_bytes));
        assert_eq!(packed.digest.len(), 64);
        assert!(packed.digest.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(packed.uncompressed_bytes, tar_bytes.len() as u64);
        assert_eq!(packed.compressed_bytes, fs::metadata(&packed.path).unwrap().len());
        assert_eq!(tar_bytes.len() % TAR_BLOCK, 0);

        // The tar reads back with sorted entries, fixed metadata and the modes of the tree.
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), 0);
            assert_eq!(header.uid().unwrap(), 0);
            assert_eq!(header.gid().unwrap(), 0);
            assert_eq!(header.username_bytes(), Some(&b""[..]));
            assert_eq!(header.groupname_bytes(), Some(&b""[..]));
            let path = entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
            let mode = header.mode().unwrap();
            match path.as_str() {
                "dist/app" => assert_eq!(mode, 0o755),
                "dist/readme.txt" => assert_eq!(mode, 0o644),
                "dist/empty" => assert_eq!(mode, 0o600),
                "dist/sub/readme-link" => {
                    assert_eq!(header.entry_type(), tar::EntryType::Symlink);
                    assert_eq!(entry.link_name().unwrap().unwrap().as_ref(), Path::new("../readme.txt"));
                }
                "dist/sub/long-link" => {
                    assert_eq!(entry.link_name().unwrap().unwrap().as_ref(), Path::new(&format!("../{LONG_NAME}")));
                }
                _ => {}
            }
            seen.push(path);
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert!(seen.contains(&format!("dist/{LONG_NAME}")));
        assert!(seen.contains(&"dist/empty-dir".to_string()));
        assert!(seen.contains(&"notes.txt".to_string()));
    }

    #[test]
    fn the_whole_workspace_can_be_packed_into_itself_without_packing_the_artifact() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let dest = workspace.path().join("artifact.tar.zst");
        let first = pack(workspace.path(), &[".".to_string()], &dest).unwrap();
        let second = pack(workspace.path(), &[".".to_string()], &dest).unwrap();
        assert_eq!(first.digest, second.digest);
        let tar_bytes = decompressed(&dest);
        let names: Vec<String> = tar::Archive::new(tar_bytes.as_slice())
            .entries()
            .unwrap()
            .map(|entry| entry.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"notes.txt".to_string()));
        assert!(names.iter().all(|name| !name.contains("artifact.tar.zst")), "{names:?}");
        // No temporary file is left beside the artifact.
        let leftovers: Vec<_> = fs::read_dir(workspace.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert!(leftovers.iter().all(|name| !name.to_string_lossy().contains("partial")), "{leftovers:?}");
    }

    fn pack_error(workspace: &Path, path: &str) -> String {
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("artifact.tar.zst");
        let error = pack(workspace, &[path.to_string()], &dest).unwrap_err().0;
        assert!(!dest.exists(), "a refused pack must leave no artifact");
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0, "a refused pack must leave no temporary file");
        error
    }

    #[test]
    fn parent_absolute_and_missing_paths_are_refused() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let error = pack_error(workspace.path(), "dist/../../etc");
        assert!(error.contains("'dist/../../etc'") && error.contains(".."), "{error}");
        let error = pack_error(workspace.path(), "/etc/passwd");
        assert!(error.contains("'/etc/passwd'") && error.contains("absolute"), "{error}");
        let error = pack_error(workspace.path(), "dist/missing.txt");
        assert!(error.contains("'dist/missing.txt'") && error.contains("does not exist"), "{error}");
        let error = pack_error(workspace.path(), "no-such-dir/file");
        assert!(error.contains("'no-such-dir/file'") && error.contains("does not exist"), "{error}");
        let error = pack_error(workspace.path(), "");
        assert!(error.contains("empty"), "{error}");
    }

    #[test]
    fn symlinks_leading_outside_the_workspace_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        write_file(outside.path(), "secret", b"secret", 0o600);

        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        symlink("../../../escape", workspace.path().join("dist/sub/escape")).unwrap();
        let error = pack_error(workspace.path(), "dist");
        assert!(error.contains("'dist/sub/escape'") && error.contains("outside the workspace"), "{error}");

        let workspace = tempfile::tempdir().unwrap();
        symlink(outside.path().join("secret"), workspace.path().join("absolute")).unwrap();
        let error = pack_error(workspace.path(), "absolute");
        assert!(error.contains("'absolute'") && error.contains("absolute path"), "{error}");

        // A relative link that stays inside lexically but goes on through a link that escapes.
        let workspace = tempfile::tempdir().unwrap();
        symlink(outside.path(), workspace.path().join("outside-dir")).unwrap();
        fs::create_dir(workspace.path().join("dist")).unwrap();
        symlink("../outside-dir/secret", workspace.path().join("dist/chained")).unwrap();
        let error = pack_error(workspace.path(), "dist");
        assert!(error.contains("'dist/chained'") && error.contains("outside the workspace"), "{error}");

        // A requested path that goes through a symlinked directory leading outside.
        let error = pack_error(workspace.path(), "outside-dir/secret");
        assert!(error.contains("'outside-dir/secret'") && error.contains("outside the workspace"), "{error}");

        // Links that stay inside are fine, even dangling ones and loops.
        let workspace = tempfile::tempdir().unwrap();
        fs::create_dir(workspace.path().join("dist")).unwrap();
        symlink("not-yet-built", workspace.path().join("dist/dangling")).unwrap();
        symlink("loop", workspace.path().join("dist/loop")).unwrap();
        symlink(".", workspace.path().join("dist/self")).unwrap();
        pack_tree(workspace.path(), &["dist"]);
    }

    #[test]
    fn verifier_agrees_with_pack_for_any_piece_size() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let (_out, packed) = pack_tree(workspace.path(), &["dist"]);
        let compressed = fs::read(&packed.path).unwrap();
        for piece_size in [1, 7, 512, 4096, 65_537, 1 << 20, compressed.len()] {
            let mut verifier = Verifier::new();
            for piece in compressed.chunks(piece_size) {
                verifier.update(piece).unwrap();
            }
            assert_eq!(verifier.finish().unwrap(), (packed.digest.clone(), packed.uncompressed_bytes), "piece size {piece_size}");
        }
        // Empty pieces in between change nothing.
        let mut verifier = Verifier::default();
        for piece in compressed.chunks(1000) {
            verifier.update(&[]).unwrap();
            verifier.update(piece).unwrap();
        }
        assert_eq!(verifier.finish().unwrap().0, packed.digest);
    }

    fn verify(bytes: &[u8]) -> Result<(String, u64), PackError> {
        let mut verifier = Verifier::new();
        for piece in bytes.chunks(10_000) {
            verifier.update(piece)?;
        }
        verifier.finish()
    }

    #[test]
    fn verifier_rejects_truncated_corrupt_and_empty_streams() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let (_out, packed) = pack_tree(workspace.path(), &["dist"]);
        let compressed = fs::read(&packed.path).unwrap();

        for cut in [1, 4, 100, compressed.len() / 2, compressed.len() - 1] {
            let error = verify(&compressed[..cut]).unwrap_err().0;
            assert!(error.contains("truncated") || error.contains("corrupt"), "cut at {cut}: {error}");
        }
        for position in [0, 5, compressed.len() / 3, compressed.len() / 2, compressed.len() - 2] {
            let mut corrupt = compressed.clone();
            corrupt[position] ^= 0x55;
            assert!(verify(&corrupt).is_err(), "corruption at byte {position} was not detected");
        }
        let mut trailing = compressed.clone();
        trailing.extend_from_slice(b"garbage after the frame");
        assert!(verify(&trailing).is_err());
        assert!(Verifier::new().finish().unwrap_err().0.contains("empty"));
        assert!(verify(&random_bytes(3, 50_000)).is_err());
    }

    #[test]
    fn pack_tar_file_digests_the_tar_bytes() {
        let workspace = tempfile::tempdir().unwrap();
        // Not a multiple of the chunk size, to exercise the last partial chunk.
        let tar_bytes = [random_bytes(11, CHUNK_BYTES + 5), b"compressible ".repeat(200_000)].concat();
        fs::write(workspace.path().join("image.tar"), &tar_bytes).unwrap();
        let dest = workspace.path().join("image.tar.zst");
        let packed = pack_tar_file(&workspace.path().join("image.tar"), &dest).unwrap();
        assert_eq!(packed.digest, sha256_hex(&tar_bytes));
        assert_eq!(packed.uncompressed_bytes, tar_bytes.len() as u64);
        assert_eq!(packed.compressed_bytes, fs::metadata(&dest).unwrap().len());
        assert!(packed.compressed_bytes < packed.uncompressed_bytes);
        assert_eq!(decompressed(&dest), tar_bytes);
        assert_eq!(verify(&fs::read(&dest).unwrap()).unwrap(), (packed.digest, packed.uncompressed_bytes));

        let error = pack_tar_file(&workspace.path().join("missing.tar"), &dest).unwrap_err().0;
        assert!(error.contains("missing.tar"), "{error}");
    }

    #[test]
    fn unpack_round_trips_contents_modes_and_links() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        fs::set_permissions(workspace.path().join("dist/sub"), fs::Permissions::from_mode(0o555)).unwrap();
        let (_out, packed) = pack_tree(workspace.path(), &["dist"]);

        let target = tempfile::tempdir().unwrap();
        let unpacked = target.path().join("release-1");
        unpack(&packed.path, &unpacked).unwrap();
        for file in ["dist/app", "dist/readme.txt", "dist/big.bin", "dist/empty", &format!("dist/{LONG_NAME}")] {
            assert_eq!(fs::read(unpacked.join(file)).unwrap(), fs::read(workspace.path().join(file)).unwrap(), "{file}");
        }
        let mode = |path: &Path| fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&unpacked.join("dist/app")), 0o755);
        assert_eq!(mode(&unpacked.join("dist/empty")), 0o600);
        assert_eq!(mode(&unpacked.join("dist/sub")), 0o555);
        assert_eq!(fs::read_link(unpacked.join("dist/sub/readme-link")).unwrap(), Path::new("../readme.txt"));
        assert!(unpacked.join("dist/empty-dir").is_dir());
        assert!(!unpacked.join("notes.txt").exists());

        // Packing what was unpacked gives the same artifact.
        let (_out, repacked) = pack_tree(&unpacked, &["dist"]);
        assert_eq!(repacked.digest, packed.digest);

        // Unpacking again over an earlier copy overwrites it in place (the read-only directory is
        // opened up first, as it would be for a user other than root).
        fs::write(unpacked.join("dist/readme.txt"), b"stale").unwrap();
        fs::set_permissions(unpacked.join("dist/sub"), fs::Permissions::from_mode(0o755)).unwrap();
        unpack(&packed.path, &unpacked).unwrap();
        assert_eq!(fs::read(unpacked.join("dist/readme.txt")).unwrap(), fs::read(workspace.path().join("dist/readme.txt")).unwrap());

        // Let the temporary directories be removed by users other than root too.
        for directory in [workspace.path().join("dist/sub"), unpacked.join("dist/sub")] {
            fs::set_permissions(directory, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn gnu_tar_extracts_the_same_tree() {
        let workspace = tempfile::tempdir().unwrap();
        build_tree(workspace.path(), false);
        let (out, packed) = pack_tree(workspace.path(), &["dist"]);
        let tar_path = out.path().join("artifact.tar");
        fs::write(&tar_path, decompressed(&packed.path)).unwrap();
        let extracted = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("tar").arg("-xf").arg(&tar_path).arg("-C").arg(extracted.path()).status().unwrap();
        assert!(status.success(), "GNU tar could not extract the archive: {status}");
        for file in ["dist/app", "dist/readme.txt", "dist/big.bin", "dist/empty", &format!("dist/{LONG_NAME}")] {
            assert_eq!(fs::read(extracted.path().join(file)).unwrap(), fs::read(workspace.path().join(file)).unwrap(), "{file}");
        }
        assert_eq!(fs::metadata(extracted.path().join("dist/app")).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(fs::read_link(extracted.path().join("dist/sub/long-link")).unwrap(), Path::new(&format!("../{LONG_NAME}")));
    }

    /// A `.tar.zst` holding one raw entry, written without the tar crate's own path checks.
    fn hostile_archive(dir: &Path, name: &[u8], entry_type: tar::EntryType, link: &[u8]) -> PathBuf {
        let mut header = tar::Header::new_gnu();
        copy_truncated(&mut header.as_old_mut().name, name);
        copy_truncated(&mut header.as_old_mut().linkname, link);
        header.set_mode(0o644);
        header.set_size(if entry_type == tar::EntryType::Regular { 4 } else { 0 });
        header.set_entry_type(entry_type);
        header.set_cksum();
        let mut tar_bytes = header.as_bytes().to_vec();
        if entry_type == tar::EntryType::Regular {
            tar_bytes.extend_from_slice(b"evil");
            tar_bytes.resize(2 * TAR_BLOCK, 0);
        }
        tar_bytes.extend_from_slice(&[0; 2 * TAR_BLOCK]);
        let path = dir.join("hostile.tar.zst");
        fs::write(&path, zstd::stream::encode_all(tar_bytes.as_slice(), 3).unwrap()).unwrap();
        path
    }

    #[test]
    fn unpack_refuses_entries_that_escape() {
        let scratch = tempfile::tempdir().unwrap();
        let dest = scratch.path().join("deploy");
        let cases: [(&[u8], tar::EntryType, &[u8], &str); 5] = [
            (b"../evil", tar::EntryType::Regular, b"", "'..'"),
            (b"/tmp/evil", tar::EntryType::Regular, b"", "absolute"),
            (b"link", tar::EntryType::Symlink, b"../../etc/passwd", "outside"),
            (b"link", tar::EntryType::Symlink, b"/etc/passwd", "outside"),
            (b"hard", tar::EntryType::Link, b"../evil", "outside"),
        ];
        for (name, entry_type, link, expected) in cases {
            let archive = hostile_archive(scratch.path(), name, entry_type, link);
            let error = unpack(&archive, &dest).unwrap_err().0;
            assert!(error.contains(expected), "{error}");
            assert!(!scratch.path().join("evil").exists());
        }
        let archive = hostile_archive(scratch.path(), b"fifo", tar::EntryType::Fifo, b"");
        assert!(unpack(&archive, &dest).unwrap_err().0.contains("unsupported"));

        fs::write(scratch.path().join("garbage.tar.zst"), b"not zstd at all").unwrap();
        assert!(unpack(&scratch.path().join("garbage.tar.zst"), &dest).is_err());
    }
}
