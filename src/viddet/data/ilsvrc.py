"""Reading the ILSVRC2015 (ImageNet VID/DET) release: its list files (``VID_train_15frames.txt``,
``VID_val_videos.txt``, ...) and its annotation XMLs, with errors that name the file and line.

The list files are looked up in ``<root>/Lists`` (MMTracking's layout) and then
``<root>/ImageSets`` (the ILSVRC2015 release layout). :mod:`viddet.data.imagenet_vid` converts what
is read here to COCO-VID JSON.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Tuple

from viddet.errors import VidDetError


def find_lists_dir(root) -> Path:
    """``<root>/Lists`` if it exists, else ``<root>/ImageSets``.

    Raises:
        VidDetError: if neither folder exists.
    """
    root = Path(root)
    for name in ('Lists', 'ImageSets'):
        if (root / name).is_dir():
            return root / name
    raise VidDetError(f'{root}: neither {root / "Lists"} nor {root / "ImageSets"} exists '
                      '(expected the ILSVRC2015 list files VID_train_15frames.txt, VID_val_videos.txt)')


def read_list_file(path: Path) -> List[Tuple[int, List[str]]]:
    """The non-empty lines of a list file as ``(line number, whitespace-separated fields)``.

    Raises:
        VidDetError: the file does not exist.
    """
    if not path.is_file():
        raise VidDetError(f'{path}: list file not found')
    out = []
    with open(path, 'r') as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if parts:
                out.append((lineno, parts))
    return out


def _int_field(path, lineno, text, what):
    try:
        return int(text)
    except ValueError:
        raise VidDetError(f'{path}:{lineno}: {what} {text!r} is not an integer') from None


def parse_train_list(path, mmtracking_compat: bool = False) -> 'OrderedDict[str, dict]':
    """Parses ``VID_train_15frames.txt`` (lines ``<video> 1 <frame> <num_frames>``).

    Args:
        path: the list file.
        mmtracking_compat: if True, store ``frame - 1`` like MMTracking's ``parse_train_list``
            (frames listed as 0 become -1, which matches no frame); otherwise the listed 0-based
            frame, checked to lie in [0, num_frames).

    Returns:
        video name -> ``{'vid_train_frames': [int, ...] (list order), 'num_frames': int}``, in
        order of first appearance.

    Raises:
        VidDetError: naming the file and line for a malformed line, an out-of-range frame or
            inconsistent frame counts.
    """
    path = Path(path)
    infos: 'OrderedDict[str, dict]' = OrderedDict()
    for lineno, parts in read_list_file(path):
        if len(parts) != 4:
            raise VidDetError(f'{path}:{lineno}: expected "<video> 1 <frame> <num_frames>", got {" ".join(parts)!r}')
        frame = _int_field(path, lineno, parts[2], 'frame number')
        num = _int_field(path, lineno, parts[3], 'frame count')
        if num <= 0:
            raise VidDetError(f'{path}:{lineno}: frame count {num} must be positive')
        if mmtracking_compat:
            frame -= 1
        elif not 0 <= frame < num:
            raise VidDetError(f'{path}:{lineno}: frame {frame} is outside 0..{num - 1} of video {parts[0]}')
        info = infos.get(parts[0])
        if info is None:
            infos[parts[0]] = dict(vid_train_frames=[frame], num_frames=num)
        else:
            if info['num_frames'] != num:
                raise VidDetError(f'{path}:{lineno}: video {parts[0]} has {num} frames here but '
                                  f'{info["num_frames"]} on an earlier line')
            info['vid_train_frames'].append(frame)
    return infos


def parse_val_list(path) -> 'OrderedDict[str, dict]':
    """Parses ``VID_val_videos.txt`` (lines ``<video> <global_start 1-based> 0 <num_frames>``).

    Returns:
        video name -> ``{'start': int, 'num_frames': int}`` in file order.

    Raises:
        VidDetError: naming the file and line for a malformed line or a duplicate video.
    """
    path = Path(path)
    infos: 'OrderedDict[str, dict]' = OrderedDict()
    for lineno, parts in read_list_file(path):
        if len(parts) != 4:
            raise VidDetError(f'{path}:{lineno}: expected "<video> <start> 0 <num_frames>", got {" ".join(parts)!r}')
        if parts[0] in infos:
            raise VidDetError(f'{path}:{lineno}: video {parts[0]} is listed twice')
        start = _int_field(path, lineno, parts[1], 'start id')
        num = _int_field(path, lineno, parts[3], 'frame count')
        if num <= 0:
            raise VidDetError(f'{path}:{lineno}: frame count {num} must be positive')
        infos[parts[0]] = dict(start=start, num_frames=num)
    return infos


def _xml_int(path, elem, tag) -> int:
    node = elem.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise VidDetError(f'{path}: missing <{tag}>')
    text = node.text.strip()
    try:
        return int(text)
    except ValueError:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if math.isfinite(v) and v.is_integer():
            return int(v)
        raise VidDetError(f'{path}: <{tag}> {text!r} is not an integer') from None


def _xml_text(path, elem, tag, required=True) -> Optional[str]:
    node = elem.find(tag)
    if node is None or node.text is None:
        if required:
            raise VidDetError(f'{path}: missing <{tag}>')
        return None
    return node.text.strip()


def parse_ilsvrc_xml(path, video: bool = True) -> dict:
    """Reads one ILSVRC annotation XML.

    Args:
        path: the XML file.
        video: VID XML (objects carry ``trackid``, ``occluded``, ``generated``) or DET XML.

    Returns:
        ``{'width': int, 'height': int, 'objects': [{'name': synset, 'xmin', 'ymin', 'xmax',
        'ymax' (int pixels, XML convention), 'trackid': str, 'occluded': bool,
        'generated': bool}, ...]}`` with the objects in XML order (VID keys only when ``video``).
        A missing ``occluded``/``generated`` element reads as False.

    Raises:
        VidDetError: naming the file for a missing file, an XML syntax error, a missing
            ``size``/``name``/``bndbox``/``trackid`` or a non-integer size or coordinate.
    """
    path = str(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise VidDetError(f'{path}: annotation file not found') from None
    except ET.ParseError as e:
        raise VidDetError(f'{path}: malformed XML ({e})') from None
    except OSError as e:
        raise VidDetError(f'{path}: cannot read ({e})') from None
    size = root.find('size')
    if size is None:
        raise VidDetError(f'{path}: missing <size>')
    width, height = _xml_int(path, size, 'width'), _xml_int(path, size, 'height')
    objects = []
    for i, obj in enumerate(root.findall('object')):
        name = _xml_text(path, obj, 'name')
        box = obj.find('bndbox')
        if box is None:
            raise VidDetError(f'{path}: object {i} ({name}) has no <bndbox>')
        o = dict(name=name, xmin=_xml_int(path, box, 'xmin'), ymin=_xml_int(path, box, 'ymin'),
                 xmax=_xml_int(path, box, 'xmax'), ymax=_xml_int(path, box, 'ymax'))
        if video:
            tid = _xml_text(path, obj, 'trackid', required=False)
            if tid is None or tid == '':
                raise VidDetError(f'{path}: object {i} ({name}) has no <trackid>')
            o['trackid'] = tid
            o['occluded'] = _xml_text(path, obj, 'occluded', required=False) == '1'
            o['generated'] = _xml_text(path, obj, 'generated', required=False) == '1'
        objects.append(o)
    return dict(width=width, height=height, objects=objects)
