# Shared shell helpers for recipes and egs: option parsing and stage logging (source this file).
# Options: any variable defined before sourcing can be set as --name value (dashes become underscores),
# as in Kaldi/ESPnet's parse_options.sh. --help lists the script's own NAME=DEFAULT lines and those of the files a
# sourced helper adds to OPTION_FILES (lib/launch.sh).

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      echo "Usage: $0 [--stage N] [--stop-stage M] [--OPTION VALUE ...]" >&2
      # Scripts may cd to their own folder before sourcing this file: find the script either way.
      src="$0"; [ -f "$src" ] || src="$(basename "$0")"
      sed -n 's/^\([a-z_][a-z_0-9]*\)=\(.*\)$/  --\1 (default: \2)/p' "$src" ${OPTION_FILES[@]+"${OPTION_FILES[@]}"} \
        | tr '_' '-' | head -60 >&2
      exit 0 ;;
    --*=*) name="${1%%=*}"; name="${name#--}"; name="${name//-/_}"; value="${1#*=}"; shift ;;
    --*) name="${1#--}"; name="${name//-/_}"; [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }
         value="$2"; shift 2 ;;
    *) echo "$0: unexpected argument '$1'" >&2; exit 1 ;;
  esac
  if ! declare -p "$name" >/dev/null 2>&1; then
    echo "$0: unknown option --${name//_/-}" >&2; exit 1
  fi
  printf -v "$name" '%s' "$value"
done

# require NAME...: stop with a message when one of these options is empty.
require() {
  local n
  for n in "$@"; do
    [ -n "${!n}" ] || { echo "$0: --${n//_/-} is required" >&2; exit 1; }
  done
}

# True when stage $1 lies within [stage, stop_stage].
stage_in() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
