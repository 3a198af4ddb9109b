"""Writes the part of a COCO-VID annotation file that covers some of its classes: a data set of your
own classes to fine-tune on (docs/finetuning.md builds its example from mini_vid this way).

    python tools/select_classes.py work_dirs/mini_vid_ann/imagenet_vid_train.json \\
        --classes car horse dog --out work_dirs/mini3/train.json [--max-frames 20]

Kept: the categories named (renumbered 1..K in the order given; ``model.classes`` of the config
must list them in that order), the videos with at least one object of them, all their frames (or
the first ``--max-frames``, frame_id < N), and the annotations of these classes; image, video and
instance ids are unchanged.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from viddet.errors import VidDetError
from viddet.fileio import atomic_write_json, read_json


def select_classes(data: dict, classes: Sequence[str], max_frames: Optional[int] = None) -> dict:
    """The subset of a loaded COCO-VID dict (see the module docstring).

    Raises:
        VidDetError: a class the file has no category of, or none of its videos has one.
    """
    by_name = {c['name']: c for c in data['categories']}
    absent = [c for c in classes if c not in by_name]
    if absent:
        raise VidDetError(f'no category named {", ".join(absent)} (the file has {", ".join(by_name)})')
    new_id = {by_name[name]['id']: i for i, name in enumerate(classes, 1)}
    images = [im for im in data['images'] if max_frames is None or im.get('frame_id', 0) < max_frames]
    image_ids = {im['id'] for im in images}
    anns = [dict(a, category_id=new_id[a['category_id']]) for a in data['annotations']
            if a['category_id'] in new_id and a['image_id'] in image_ids]
    video_ids = {a.get('video_id') for a in anns}
    if not anns:
        raise VidDetError(f'no object of {", ".join(classes)} in the file')
    videos = [dict(v, vid_train_frames=[f for f in v.get('vid_train_frames', []) if max_frames is None or f < max_frames])
              for v in data.get('videos', []) if v['id'] in video_ids]
    cats = [dict(by_name[name], id=i) for i, name in enumerate(classes, 1)]
    return {'categories': cats, 'videos': videos,
            'images': [im for im in images if im.get('video_id') in video_ids],
            'annotations': [a for a in anns if a.get('video_id') in video_ids]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('ann', help='COCO-VID annotation JSON')
    p.add_argument('--classes', nargs='+', required=True, help='category names to keep, in label order')
    p.add_argument('--out', required=True, help='the subset JSON to write')
    p.add_argument('--max-frames', type=int, default=None, help='keep only the first N frames of every video')
    args = p.parse_args(argv)
    try:
        out = select_classes(read_json(args.ann, 'annotation file'), args.classes, args.max_frames)
    except VidDetError as e:
        print(f'{args.ann}: error: {e}', file=sys.stderr)
        return 2
    atomic_write_json(args.out, out)
    print(f'{args.out}: {len(out["videos"])} videos, {len(out["images"])} images, {len(out["annotations"])} objects '
          f'of {", ".join(args.classes)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
