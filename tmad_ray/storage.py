"""Files under "a local directory or a URI" (``s3://``, ``gs://``, ... as ``pyarrow.fs`` reads them).

Both places that keep files which must outlive a process use this one class: the clip cache
(``storage.clip_cache``) and the studies' results (``storage.ray_results``, Ray's
``storage_path``). Paths are given as parts (``store.read_text("study-1", "tmad_study.json")``);
writes go to a temporary name and are moved into place, so a reader never sees half a file (a
single-object write on an object store is atomic too).
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


class Storage:
    """A directory tree on local disk or an object store."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or root
        if "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(self.root)
            self.scheme = self.root.split("://", 1)[0]
        else:
            self.fs, self.base = pafs.LocalFileSystem(), os.path.abspath(root)
            self.scheme = None

    def __reduce__(self):  # ship the root to Ray tasks, not the filesystem handle
        return (Storage, (self.root,))

    @property
    def remote(self) -> bool:
        return self.scheme is not None

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` (what ``self.fs`` takes)."""
        return "/".join([self.base, *parts])

    def uri(self, *parts: str) -> str:
        """``parts`` as Ray and ``pyarrow`` readers take it: an absolute local path, or ``scheme://...``."""
        path = self.path(*parts)
        return f"{self.scheme}://{path}" if self.remote else path

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def make_dirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def read_bytes(self, *parts: str) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        if not self.is_file(*parts):
            return None
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_text(self, *parts: str) -> str:
        """The file's text; ``FileNotFoundError`` when there is no such file."""
        body = self.read_bytes(*parts)
        if body is None:
            raise FileNotFoundError(self.uri(*parts))
        return body.decode()

    def write(self, parts: tuple[str, ...] | list[str], write) -> None:
        """Call ``write(stream)`` on a temporary file, then move it to ``parts``: all or nothing."""
        final = self.path(*parts)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as f:
                write(f)
            self.fs.move(tmp, final)
        except BaseException:
            if self.fs.get_file_info(tmp).type == pafs.FileType.File:
                self.fs.delete_file(tmp)
            raise

    def write_bytes(self, body: bytes, *parts: str) -> None:
        self.write(parts, lambda f: f.write(body))

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def mtime(self, *parts: str) -> float:
        """Modification time (epoch seconds; 0.0 where the store keeps none)."""
        info = self.fs.get_file_info(self.path(*parts))
        return info.mtime.timestamp() if info.mtime else 0.0

    def subdirs(self, *parts: str) -> list[str]:
        """Names of the directories directly under ``parts`` (none when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return sorted(i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.Directory)

    def size_bytes(self, *parts: str) -> int:
        """Bytes of every file under ``parts``."""
        sel = pafs.FileSelector(self.path(*parts), recursive=True, allow_not_found=True)
        return sum(i.size for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def copy_dir_to(self, local: "str | os.PathLike", *parts: str):
        """The directory ``parts`` copied to the local directory ``local`` (replaced); returns its path."""
        import shutil
        from pathlib import Path

        if self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.Directory:
            raise FileNotFoundError(self.uri(*parts))
        out = Path(local)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        pafs.copy_files(self.path(*parts), str(out), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return out
