"""The test suite (a package, so that `tests.*` imports find it before any installed `tests`
package: learn2learn, a benchmark peer, installs one)."""
