"""The ImageNet VID label set (MMTracking ``ImagenetVIDDataset.CLASSES`` order)."""

VID_CLASSES = (
    'airplane', 'antelope', 'bear', 'bicycle', 'bird', 'bus', 'car', 'cattle', 'dog',
    'domestic_cat', 'elephant', 'fox', 'giant_panda', 'hamster', 'horse', 'lion', 'lizard',
    'monkey', 'motorcycle', 'rabbit', 'red_panda', 'sheep', 'snake', 'squirrel', 'tiger',
    'train', 'turtle', 'watercraft', 'whale', 'zebra')
"""The 30 ImageNet VID classes in MMTracking's label order (label 0..29, COCO category id 1..30)."""

VID_SYNSETS = (
    'n02691156', 'n02419796', 'n02131653', 'n02834778', 'n01503061', 'n02924116', 'n02958343',
    'n02402425', 'n02084071', 'n02121808', 'n02503517', 'n02118333', 'n02510455', 'n02342885',
    'n02374451', 'n02129165', 'n01674464', 'n02484322', 'n03790512', 'n02324045', 'n02509815',
    'n02411705', 'n01726692', 'n02355227', 'n02129604', 'n04468005', 'n01662784', 'n04530566',
    'n02062744', 'n02391049')
"""WordNet synsets of :data:`VID_CLASSES`, same order (the ``name`` field of the ILSVRC XMLs)."""
