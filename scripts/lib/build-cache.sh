# Sourced by scripts/test and scripts/fuzz: keeps a cached cargo build dir from filling the disk.
# Cargo never prunes a target dir; a full disk shows up as the linker dying of SIGBUS halfway
# through a build (seen in CI), so a dir that grew too large, or sits on a nearly full disk, is
# started afresh instead.

# prune_build_dir WHO DIR MAX_GIB MIN_FREE_GIB: reports DIR's size and the free disk (as WHO),
# removes DIR when it holds more than MAX_GIB or less than MIN_FREE_GIB is free, and leaves the
# free KiB afterwards in $build_dir_free_kib for the caller's own check.
prune_build_dir() {
  local who="$1" dir="$2" max_gib="$3" min_free_gib="$4" used_kib
  mkdir -p "$dir"
  used_kib="$(du -sk "$dir" 2>/dev/null | cut -f1)" || used_kib=0
  used_kib="${used_kib:-0}"
  build_dir_free_kib="$(df -Pk "$dir" | awk 'NR==2 {print $4}')"
  echo "$who: build dir $dir holds $((used_kib / 1024)) MiB; $((build_dir_free_kib / 1024)) MiB free on its disk" >&2
  if [ "$used_kib" -gt $((max_gib * 1024 * 1024)) ] \
    || { [ "$build_dir_free_kib" -lt $((min_free_gib * 1024 * 1024)) ] && [ "$used_kib" -gt 0 ]; }; then
    echo "$who: removing $dir (too large or disk nearly full); building from scratch" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    build_dir_free_kib="$(df -Pk "$dir" | awk 'NR==2 {print $4}')"
  fi
}
