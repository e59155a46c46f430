#!/usr/bin/env bash
# Restyle a video with a saved style: ffmpeg splits it into frames, clipstyle
# restyles every frame in one forward pass each (no CLIP, no optimisation), and
# ffmpeg joins the frames again with the original audio.
#
#   clipstyle run -p "ink wash painting" still.jpg --save-style ink.style   # train the style once
#   examples/video.sh ink.style input.mp4 styled.mp4 [extra clipstyle apply options]
#
# Rerunning resumes: frames already styled are skipped. Frames are styled at the
# video's own resolution; add e.g. --size 720 to go faster.
set -euo pipefail
style=${1:?usage: video.sh STYLE INPUT OUTPUT [apply options]}
input=${2:?usage: video.sh STYLE INPUT OUTPUT [apply options]}
output=${3:?usage: video.sh STYLE INPUT OUTPUT [apply options]}
work=${WORK:-$(mktemp -d)}
mkdir -p "$work/frames" "$work/styled"

fps=$(ffprobe -v error -select_streams v:0 -show_entries stream=r_frame_rate -of default=nw=1:nk=1 "$input")
ffmpeg -v error -n -i "$input" "$work/frames/%06d.png"
clipstyle apply "$style" "$work/frames" -o "$work/styled" --report "$work/frames.jsonl" "${@:4}"

# Outputs are named <frame>-<style>.png; the pattern below follows the style file's name.
name=$(basename "${style%.*}")
ffmpeg -v error -y -framerate "$fps" -i "$work/styled/%06d-$name.png" -i "$input" \
    -map 0:v -map 1:a? -c:v libx264 -pix_fmt yuv420p -crf 18 -c:a copy -shortest "$output"
echo "wrote $output (frames in $work)"
