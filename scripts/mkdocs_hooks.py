"""MkDocs hook: publish the figures and notes under `benchmarks/` with the documentation site.

MkDocs only builds files inside `docs_dir` (`docs/`), and a strict build fails on a link to a
file outside it. The benchmark figures stay where the scripts that make them write them
(`benchmarks/**/*.png`, with their notes `benchmarks/**/*.md`); this hook adds each one to the
site at the same path (`benchmarks/...`), so a page links to it as `/benchmarks/...`: GitHub
resolves that from the repository root, and MkDocs (`validation.links.absolute_links:
relative_to_docs` in mkdocs.yml) resolves it against the site's files, checks that it exists,
and rewrites it to a relative link.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ("benchmarks/**/*.png", "benchmarks/**/*.md")


def on_files(files: Files, config) -> Files:
    for pattern in PATTERNS:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                # NOT_IN_NAV: a page reached by its link, not listed in the navigation
                files.append(File.generated(config, uri, abs_src_path=str(path),
                                            inclusion=InclusionLevel.NOT_IN_NAV))
    return files
