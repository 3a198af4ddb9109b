"""Command-line interface: ``viddet demo|test|eval|convert|check-data|train|benchmark|export``.

Each subcommand parses its arguments and calls one function; user errors (:class:`VidDetError`)
are printed as one clear message without a traceback (exit status 2); SIGINT (Ctrl-C) and SIGTERM
stop a command the same way, each keeping what it finished, with status 130 and 143
(:mod:`viddet.interrupts`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from contextlib import nullcontext
from pathlib import Path

from viddet.data.output_paths import check_output_options, write_failures_reported
from viddet.errors import VidDetError
from viddet.methods import METHOD_NAMES, METHODS
from viddet.methods.base import MethodSettings
from viddet.methods.yolov import VARIANTS as YOLOX_VARIANTS
from viddet.models.backbones import BACKBONE_NAMES
from viddet.version import __version__


# ---------------------------------------------------------------- demo (owner: core)
def add_inference_options(p, mode_default=None):
    """The options ``demo`` and ``test`` share: which model, where it runs, its inference settings."""
    p.add_argument('--method', choices=METHOD_NAMES, default=None,
                   help='VID method (default: what the checkpoint is, else selsa)')
    p.add_argument('--checkpoint', default=None,
                   help='checkpoint file, URL or model-zoo name such as selsa_r50, fgfa_r101, dff_x101, troi_r50 '
                        '(default: the zoo checkpoint of --method), or an ONNX export folder (viddet export)')
    p.add_argument('--backbone', choices=BACKBONE_NAMES, default=None,
                   help='backbone (default: what the checkpoint is)')
    p.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda, cuda:1 ...')
    p.add_argument('--threads', type=int, default=None,
                   help='CPU threads (default: the cores this process is given)')
    p.add_argument('--set', action='append', default=[], metavar='test.KEY=VALUE', dest='overrides',
                   help=f'inference setting of the method (repeatable): {settings_help()}')


def settings_help() -> str:
    """Every method's inference settings with their defaults, read off its ``Settings`` dataclass
    (:class:`viddet.methods.base.MethodSettings` and the fields the method adds)."""
    common = set(MethodSettings.names())
    parts = []
    for m in METHODS:
        own = [f'{f.name} ({f.default})' for f in dataclasses.fields(m.Settings) if f.name not in common]
        if own:
            parts.append(f'{m.name}: {", ".join(own)}')
    parts.append('every method: ' + ', '.join(f'{f.name} ({f.default})' for f in dataclasses.fields(MethodSettings)))
    return '; '.join(parts).replace('%', '%%')


def add_link_option(p, what: str):
    """``--link seqnms|online|none`` (:mod:`viddet.linking`), shared by ``demo``, ``test`` and ``eval``."""
    from viddet.linking.link import LINK_MODES
    p.add_argument('--link', choices=LINK_MODES, default='none',
                   help='link the detections into objects with track ids: seqnms (Seq-NMS over the whole video: '
                        'rescored tubes, duplicates removed), online (causal IoU tracker, frame by frame; for '
                        f'streams), none (default); {what}. See docs/linking.md')


def add_demo_parser(sub):
    p = sub.add_parser(
        'demo', help='detect objects in a video (file, frame folder, camera, stream): annotated MP4 + JSON lines',
        description='Detect objects in every frame of a video and write an annotated MP4 and one JSON '
                    'record per frame ({"frame", "file", "boxes" [x1,y1,x2,y2] in pixels, "scores", "labels", '
                    '"names"}, plus "track_ids" with --link). Every output is checked before the model loads; '
                    'a stopped run keeps what it finished under .partial names. Default checkpoints per method '
                    '(model zoo, downloaded once into $VIDDET_HOME, default ~/.cache/viddet): '
                    + ', '.join(f'{m.name}: {m.default_checkpoint}' for m in METHODS if m.default_checkpoint) + '.')
    p.add_argument('input', help='video file, folder of frames (sorted by numeric name), camera (0, /dev/video0) '
                                 'or rtsp/http stream URL')
    add_inference_options(p)
    p.add_argument('--mode', choices=('offline', 'online'), default=None,
                   help='offline: MMTracking test protocol, uses future frames (default for files/folders); '
                        'online: causal, past frames only (default for cameras/streams)')
    add_link_option(p, 'the JSON records get "track_ids" and the video a colour and "#id" per object')
    p.add_argument('--out', default=None,
                   help='annotated video (.mp4); default <input name>_<method>.mp4. Written as <out>.partial.mp4 and '
                        'renamed when complete; a stopped run keeps its frames in the .partial file')
    p.add_argument('--json', default=None,
                   help='detections as JSON lines; default: the --out path with .jsonl (partial results: '
                        '<json>.partial.jsonl)')
    p.add_argument('--score-thr', type=float, default=0.5,
                   help='draw boxes scoring at least this, in [0, 1] (the JSON keeps every detection); default 0.5')
    p.add_argument('--fps', type=float, default=None, help='output frame rate (default: the input\'s, else 25)')
    p.add_argument('--max-frames', type=int, default=None, help='process only the first N frames')
    p.add_argument('--random-weights', action='store_true',
                   help='no checkpoint, random weights: exercises the pipeline only, detections are meaningless')

    def run(args):
        from viddet.demo import run_demo
        return run_demo(args)
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------- convert / check-data / eval / test (owner: data+eval)
def add_data_parsers(sub):
    """``viddet convert``, ``viddet check-data`` and ``viddet eval`` (``viddet test`` reuses
    :func:`viddet.evaluation.vid.evaluate_and_report` for its report)."""
    # convert
    p = sub.add_parser('convert', help='convert ILSVRC2015 VID/DET XML annotations to COCO-VID JSON (MMTracking schema)',
                       description='Write imagenet_vid_train.json, imagenet_vid_val.json and, when Annotations/DET '
                                   'exists, imagenet_det_30plus1cls.json with exactly the schema of MMTracking\'s '
                                   'converters. List files are read from ROOT/Lists or ROOT/ImageSets.')
    p.add_argument('dataset', choices=['imagenet-vid'], help='dataset format (imagenet-vid: ILSVRC2015 VID + DET)')
    p.add_argument('--root', required=True, help='ILSVRC folder (Data/, Annotations/, Lists/ or ImageSets/)')
    p.add_argument('--out', required=True, help='output folder for the JSON files, e.g. data/ILSVRC/annotations')
    p.add_argument('--mmtracking-compat', action='store_true',
                   help='reproduce MMTracking\'s training-frame off-by-one (frame - 1; 57,690 instead of 57,834 '
                        'training frames), as the published checkpoints were trained')
    p.add_argument('--skip-bad', action='store_true',
                   help='keep going past missing/malformed XMLs (frames kept without objects) and list them at the end')
    p.add_argument('--splits', nargs='+', choices=['train', 'val', 'det'], default=['train', 'val', 'det'],
                   help='what to convert (default: all; det is skipped when absent)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')

    def run_convert(args):
        from viddet.data.imagenet_vid import convert_imagenet_vid
        convert_imagenet_vid(args.root, args.out, mmtracking_compat=args.mmtracking_compat, skip_bad=args.skip_bad,
                             splits=args.splits, progress=not args.no_progress)
        return 0
    p.set_defaults(func=run_convert)

    # check-data
    p = sub.add_parser('check-data', help='validate a COCO-VID annotation file and its frames',
                       description='Report bad boxes, missing frame files, unknown categories, duplicate ids, '
                                   'broken references and frame numbering. Exit status 1 when problems are found.')
    p.add_argument('ann', help='annotation JSON')
    p.add_argument('--root', default=None,
                   help='folder the file_name paths are relative to (ROOT, ROOT/Data/VID or ROOT/Data/DET are tried); '
                        'without it frame files are not checked')
    p.add_argument('--max-listed', type=int, default=20, help='messages listed per problem kind (all are counted)')

    def run_check(args):
        from viddet.data.check import check_data
        report = check_data(args.ann, args.root, max_listed=args.max_listed)
        print(report.format())
        return 0 if report.ok else 1
    p.set_defaults(func=run_check)

    # eval
    p = sub.add_parser('eval', help='score detections: COCO AP50 (MMTracking), ImageNet VID mAP, slow/medium/fast',
                       description='Evaluate a results file (COCO results JSON [{image_id, category_id, bbox [x,y,w,h], '
                                   'score}] or devkit txt "<frame id> <class> <score> <x1> <y1> <x2> <y2>") against a '
                                   'COCO-VID annotation file.')
    p.add_argument('results', help='results .json (COCO) or .txt (devkit format)')
    p.add_argument('--ann', required=True, help='annotation JSON, e.g. data/ILSVRC/annotations/imagenet_vid_val.json')
    p.add_argument('--motion-iou', default=None,
                   help='official imagenet_vid_groundtruth_motion_iou.mat (needs image id = global val frame id); '
                        'without it the motion IoU is computed from the ground truth and labelled as computed')
    p.add_argument('--out-dir', default=None,
                   help='write results.json, detections_vid.txt, ap_table.txt, metrics.json and PR-curve PNGs here')
    p.add_argument('--json', default=None, help='write the metrics dict to this JSON file')
    p.add_argument('--no-coco', action='store_true', help='skip pycocotools (minutes on the full val set)')
    p.add_argument('--no-devkit-rounding', action='store_true',
                   help='do not quantise scores/boxes to the devkit txt precision (%%.4f / %%.2f)')
    add_link_option(p, 'the linked detections are scored, plus ID switches / MOTA / IDF1 against the '
                       'annotations\' instance ids; videos and frame order come from --ann')
    p.add_argument('--allow-empty-frames', action='store_true',
                   help='with --link: frames of --ann without any detection in the results are empty frames '
                        '(default: an error naming the frame, since it usually means results of other frames)')

    def run_eval(args):
        from viddet.engine.link_results import link_results, report_identity
        from viddet.evaluation.io import load_ground_truth, load_results
        from viddet.evaluation.report import evaluate_and_report
        check_output_options(folders=[('--out-dir', args.out_dir)], files=[('--json', args.json)])
        gt = load_ground_truth(args.ann) if Path(args.results).suffix.lower() == '.txt' else None
        results = link_results(load_results(args.results, gt), args.ann, args.link, where=args.results,
                               allow_empty=args.allow_empty_frames)
        evaluate_and_report(results, args.ann, motion_iou=args.motion_iou, out_dir=args.out_dir, json_path=args.json,
                            coco=not args.no_coco, devkit_rounding=not args.no_devkit_rounding)
        if args.link != 'none' or (results and 'track_id' in results[0]):   # linked now or saved linked
            report_identity(results, args.ann, args.json)
        return 0
    p.set_defaults(func=run_eval)


# ---------------------------------------------------------------- test (owner: core)
def add_test_parser(sub):
    p = sub.add_parser(
        'test', help='run a model over every video of an annotation file and report COCO AP50 and VID mAP',
        description='Run a VID method over every video of a COCO-VID annotation file (offline = MMTracking test '
                    'protocol by default), save the raw detections (<out-dir>/results.json, re-scorable with '
                    '`viddet eval`), and report COCO AP50 (as MMTracking) and the official ImageNet VID mAP with '
                    'slow/medium/fast. Shard over processes with `torchrun --nproc_per_node N -m viddet test ...`.')
    p.add_argument('ann', help='COCO-VID annotation JSON, e.g. data/ILSVRC/annotations/imagenet_vid_val.json')
    p.add_argument('--root', required=True, help='folder the file_name paths are relative to, e.g. data/ILSVRC/Data/VID')
    add_inference_options(p)
    p.add_argument('--mode', choices=('offline', 'online'), default='offline')
    p.add_argument('--out-dir', default='work_dirs/test', help='detections, plots and tables go here')
    p.add_argument('--motion-iou', default=None,
                   help='official imagenet_vid_groundtruth_motion_iou.mat (else computed from the ground truth)')
    p.add_argument('--json', default=None, help='write the metrics here (default <out-dir>/metrics.json)')
    p.add_argument('--max-videos', type=int, default=None, help='only the first N videos (smoke tests)')
    p.add_argument('--resume', action='store_true',
                   help='continue an interrupted run in --out-dir: the videos it saved are not run again')
    add_link_option(p, 'each video is linked when done, saved and scored linked (with a track_id per result), '
                       'plus ID switches / MOTA / IDF1 against the instance ids')

    def run(args):
        from viddet.api import detector_from_args
        from viddet.engine.evaluate import check_out_dir, run_test
        from viddet.engine.link_results import report_identity
        from viddet.evaluation.report import evaluate_and_report
        from viddet.locks import output_lock
        from viddet.runtime import world_info
        first = world_info()[0] == 0
        with output_lock(args.out_dir, f'--out-dir {args.out_dir}', is_dir=True) if first else nullcontext():
            check_out_dir(args.out_dir, args.resume)   # before the model is loaded
            check_output_options(files=[('--json', args.json)])
            detector = detector_from_args(args)
            results = run_test(detector, args.ann, args.root, args.out_dir, mode=args.mode,
                               max_videos=args.max_videos, resume=args.resume, link=args.link)
            if results is not None:
                ann = Path(args.out_dir) / 'annotations_subset.json' if args.max_videos else args.ann
                metrics_json = args.json or str(Path(args.out_dir) / 'metrics.json')
                with write_failures_reported(f'{Path(args.out_dir) / "results.json"} holds the detections '
                                             f'(score them with viddet eval)'):
                    evaluate_and_report(results, str(ann), args.motion_iou, args.out_dir, metrics_json)
                    if args.link != 'none':
                        report_identity(results, str(ann), metrics_json)
        return 0
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------- train (owner: training)
def add_train_parser(sub):
    p = sub.add_parser(
        'train', help='train a method (single/dff/fgfa/selsa/troi) from a YAML config; torchrun for several processes',
        description='Train a VID method with MMTracking\'s recipe from a YAML config (configs/*.yaml). '
                    'Checkpoints (epoch_<n>.pth) load directly into viddet test/demo. Several processes: '
                    'torchrun --nproc_per_node N -m viddet train CONFIG ... (DDP; gloo on CPU, nccl on GPU).')
    p.add_argument('config', help='YAML config, e.g. configs/selsa_r50.yaml')
    p.add_argument('--work-dir', default=None,
                   help='checkpoints, logs, TensorBoard and evaluations (default work_dirs/<config name>)')
    p.add_argument('--resume', action='store_true',
                   help='continue bit-for-bit from the newest intact checkpoint in --work-dir')
    p.add_argument('--overwrite', action='store_true',
                   help='start afresh in a --work-dir that holds an earlier run (deletes what its viddet_run.json '
                        'lists: checkpoints, logs, evaluations; a folder holding other files is refused); without '
                        '--resume or --overwrite such a work dir is refused')
    p.add_argument('--save-interval', type=int, default=None, metavar='N',
                   help='also save iter_<n>.pth every N optimizer steps, so that a preempted run loses at most N steps')
    p.add_argument('--keep-checkpoints', type=int, default=2, metavar='K',
                   help='keep the newest K iter_<n>.pth (default 2; 0 keeps all); epoch_<e>.pth are always kept')
    p.add_argument('--amp', choices=('fp16', 'bf16'), default=None,
                   help='mixed precision (fp16 on GPU with a loss scaler starting at 512; bf16 also on CPU)')
    p.add_argument('--accumulate', type=int, default=1, metavar='K',
                   help='accumulate K micro-batches per optimizer step (= a K x larger batch; the lr scales with it)')
    p.add_argument('--max-iters', type=int, default=None, metavar='N',
                   help='stop after N optimizer steps in total (saves iter_<N>.pth)')
    p.add_argument('--val-interval', type=int, default=None, metavar='E',
                   help='evaluate on data.val every E epochs (default: eval.interval; always at the end)')
    p.add_argument('--no-eval', action='store_true', help='no evaluation at all')
    p.add_argument('--device', default='auto',
                   help='auto (CUDA if available), cpu, cuda, cuda:1 ... (under torchrun cuda = cuda:<LOCAL_RANK>)')
    p.add_argument('--backbone-weights', default=None, metavar='W',
                   help='initial backbone weights: torchvision://resnet50, torchvision://resnet101, '
                        'open-mmlab://resnext101_64x4d (downloaded once into $VIDDET_HOME), a .pth file, a URL, or '
                        'random; overrides init.backbone_weights (default: the backbone\'s ImageNet weights)')
    p.add_argument('--flownet-weights', default=None, metavar='W',
                   help='initial FlowNet weights (DFF/FGFA): flownet_simple (MMTracking\'s, the default), a file, a '
                        'URL, or random; overrides init.flownet_weights')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', dest='overrides',
                   help='override a config value, e.g. --set schedule.epochs=3 --set data.scale=[600,360] (repeatable)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--threads', type=int, default=None,
                   help='CPU threads per process (default: the cores this process is given, divided between torchrun\'s '
                        'processes; 1 is faster on a CPU busy with other jobs)')

    def run(args):
        from pathlib import Path

        from viddet.config.training import load_config
        from viddet.engine.train import train
        from viddet.engine.train_options import TrainOptions
        overrides = list(args.overrides)
        if args.backbone_weights:
            overrides.append(f'init.backbone_weights={args.backbone_weights}')
        if args.flownet_weights:
            overrides.append(f'init.flownet_weights={args.flownet_weights}')
        cfg = load_config(args.config, overrides)
        work_dir = args.work_dir or str(Path('work_dirs') / Path(args.config).stem)
        train(cfg, work_dir, TrainOptions.from_args(args))
        return 0

    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------- benchmark (owner: speed)
def add_benchmark_parser(sub):
    p = sub.add_parser('benchmark', help='measure per-frame latency, fps, per-stage time and peak memory',
                       description='Run a method over a synthetic video (smooth random frames; random '
                                   'weights unless --checkpoint: the network cost does not depend on '
                                   'them) and report latency (median, p90, excluding frame decoding), '
                                   'fps, the per-stage breakdown and peak memory (CUDA: max allocated; '
                                   'CPU: peak RSS increase). Parity with MMTracking holds only at fp32.')
    p.add_argument('--method', required=True, choices=METHOD_NAMES)
    p.add_argument('--backbone', default='r50', choices=BACKBONE_NAMES + tuple(YOLOX_VARIANTS),
                   help='r50 (default), ...; yolox_s, yolox_l or yolox_x for yolov / yolovpp')
    p.add_argument('--size', default='1000x600', help='frame WIDTHxHEIGHT in pixels (default 1000x600)')
    p.add_argument('--frames', type=int, default=20, help='timed frames (default 20)')
    p.add_argument('--warmup', type=int, default=2,
                   help='untimed frames before them (default 2; FGFA needs 15 to time full 31-frame windows)')
    p.add_argument('--device', default='cpu', help='cpu, cuda or auto (default cpu)')
    p.add_argument('--amp', choices=('bf16', 'fp16'), default=None,
                   help='autocast dtype (default fp32; detections then differ from MMTracking)')
    p.add_argument('--mode', choices=('offline', 'online'), default='offline')
    p.add_argument('--no-ref-cache', action='store_true',
                   help='SELSA/TRoI: recompute the references every frame, as MMTracking does')
    p.add_argument('--plain', action='store_true',
                   help='the plain modules, without the fast paths of viddet.speedups (same detections)')
    p.add_argument('--checkpoint', default=None, help='weights (path, URL or zoo name); default random')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: the cores this process is given)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and frames')
    p.add_argument('--json', default=None, metavar='FILE', help='write the results as JSON (atomically)')

    def run(args):
        from viddet.benchmark import run_cli
        check_output_options(files=[('--json', args.json)])
        return run_cli(args)

    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------- export (owner: deploy)
def run_export(args) -> int:
    """``viddet export``: the checkpoint's plain modules -> ``args.out`` (:func:`viddet.export.export_model`)."""
    from viddet.checkpoints.loading import load_model
    from viddet.export import export_model
    from viddet.export.folder import describe_stages
    loaded = load_model(args.checkpoint, args.method, fast=False)
    manifest = export_model(loaded.model, Path(args.out), loaded.class_names, loaded.scale, loaded.test,
                            loaded.path, args.opset)
    print(f'exported {manifest["method"]} ({manifest["backbone"]}) to {args.out}:')
    for line in describe_stages(manifest):
        print(f'  {line}')
    return 0


def add_export_parser(sub):
    about = ('Write DIR/ with one ONNX graph per stage of the method and DIR/model.json; `viddet demo|test|benchmark '
             '--checkpoint DIR` runs it on ONNX Runtime. Needs pip install "viddet[export]"; see docs/deployment.md')
    p = sub.add_parser('export', help='export a checkpoint to ONNX graphs', description=about)
    p.add_argument('checkpoint', help='checkpoint file, URL or model-zoo name (selsa_r50, dff_r50 ...)')
    p.add_argument('--out', required=True, metavar='DIR', help='the export folder (created)')
    p.add_argument('--method', choices=METHOD_NAMES, default=None,
                   help='VID method (default: what the checkpoint is; single: the detector of any VID checkpoint)')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset, 13 to 20 (default 17)')
    p.set_defaults(func=run_export)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='viddet',
        description='Video object detection with DFF, FGFA, SELSA and Temporal RoI Align '
                    '(Faster R-CNN DC5); loads MMTracking checkpoints unchanged.')
    parser.add_argument('--version', action='version', version=f'viddet {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    add_demo_parser(sub)
    add_data_parsers(sub)
    add_test_parser(sub)
    add_train_parser(sub)
    add_benchmark_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    from viddet.interrupts import describe, exit_status, handle_interrupts
    try:
        with handle_interrupts():   # SIGTERM as Ctrl-C
            result = args.func(args)
    except VidDetError as e:
        print(f'viddet {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # 130 (SIGINT) or 143 (SIGTERM)
        print(f'viddet {args.command}: {describe(e)}', file=sys.stderr)
        return exit_status(e)
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(main())
