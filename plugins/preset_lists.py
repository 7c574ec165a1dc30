"""The known class names, domains and image counts of the benchmark presets (``presets``), and the
Cityscapes classes and their SYNTHIA subsets (``seg_datasets``, ``presets``' ``synthia``).

Where each list and count comes from is said beside it; a folder-classes list is sorted as the
harness sorts class folders (``sorted``, so capitals first), a list whose label ids are official
(VisDA-2017, DomainNet) is in label-id order.
"""

from __future__ import annotations

from dataclasses import dataclass

# Office-31 (Saenko et al. 2010), domain_adaptation_images/<domain>/images/<class>/: the 31 folder
# names as in Transfer-Learning-Library's tllib/vision/datasets/office31.py. Counts: the paper's
# and every later table's (amazon 2817, dslr 498, webcam 795; 4110 in all).
OFFICE31_CLASSES = (
    "back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair",
    "desk_lamp", "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer",
    "letter_tray", "mobile_phone", "monitor", "mouse", "mug", "paper_notebook", "pen", "phone",
    "printer", "projector", "punchers", "ring_binder", "ruler", "scissors", "speaker", "stapler",
    "tape_dispenser", "trash_can",
)  # fmt: skip
OFFICE31_COUNTS = {"amazon": 2817, "dslr": 498, "webcam": 795}

# Office-Home (Venkateswara et al. 2017): the 65 folder names as in tllib's officehome.py (there
# unsorted) and DomainBed's office_home, sorted here. Counts: the dataset page's table (Art 2427,
# Clipart 4365, Product 4439, Real World 4357; 15588 in all), also DomainBed's.
OFFICE_HOME_CLASSES = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
    "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
    "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder",
    "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop",
    "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen",
    "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler", "Scissors",
    "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table",
    "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
)  # fmt: skip
OFFICE_HOME_COUNTS = {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real_World": 4357}

# PACS (Li et al. 2017) as DomainBed downloads it: 7 classes; counts from the paper (art_painting
# 2048, cartoon 2344, photo 1670, sketch 3929; 9991), as paperswithcode's PACS page repeats them.
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
PACS_COUNTS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}

# VLCS (Fang et al. 2013) as DomainBed downloads it (folder names bird car chair dog person);
# counts as DomainBed's paper tables them (10729 in all).
VLCS_CLASSES = ("bird", "car", "chair", "dog", "person")
VLCS_COUNTS = {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376}

# TerraIncognita (Beery et al. 2018), DomainBed's four locations and 10 classes, as its
# scripts/download.py builds them; counts as DomainBed tables them (24330 in all).
TERRA_CLASSES = (
    "bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel",
)  # fmt: skip
TERRA_COUNTS = {"location_100": 4741, "location_38": 9736, "location_43": 3970, "location_46": 5883}

# VisDA-2017 classification (Peng et al. 2017): label ids 0..11 as in the image_list.txt files
# (the same order in tllib's visda2017.py). Counts: the paper's (train 152397 synthetic,
# validation 55388 real); test 72372 is the paper's YouTube-BB test set, quoted from memory.
VISDA_CLASSES = (
    "aeroplane", "bicycle", "bus", "car", "horse", "knife", "motorcycle", "person", "plant",
    "skateboard", "train", "truck",
)  # fmt: skip
VISDA_COUNTS = {"train": 152397, "validation": 55388, "test": 72372}

# DomainNet (Peng et al. 2019), the cleaned version: the 345 folder names in the label-id order of
# the official <domain>_train.txt / <domain>_test.txt lists, as tllib's domainnet.py lists them
# (case-insensitive, so The_Eiffel_Tower is 308). Counts per domain: the DomainNet
# site's table (ai.bu.edu/M3SDA), which the task brief quotes; they are the line counts of each
# domain's train + test lists (not re-checked here: no download).
DOMAINNET_CLASSES = (
    "aircraft_carrier", "airplane", "alarm_clock", "ambulance", "angel", "animal_migration", "ant",
    "anvil", "apple", "arm", "asparagus", "axe", "backpack", "banana", "bandage", "barn",
    "baseball", "baseball_bat", "basket", "basketball", "bat", "bathtub", "beach", "bear", "beard",
    "bed", "bee", "belt", "bench", "bicycle", "binoculars", "bird", "birthday_cake", "blackberry",
    "blueberry", "book", "boomerang", "bottlecap", "bowtie", "bracelet", "brain", "bread",
    "bridge", "broccoli", "broom", "bucket", "bulldozer", "bus", "bush", "butterfly", "cactus",
    "cake", "calculator", "calendar", "camel", "camera", "camouflage", "campfire", "candle",
    "cannon", "canoe", "car", "carrot", "castle", "cat", "ceiling_fan", "cello", "cell_phone",
    "chair", "chandelier", "church", "circle", "clarinet", "clock", "cloud", "coffee_cup",
    "compass", "computer", "cookie", "cooler", "couch", "cow", "crab", "crayon", "crocodile",
    "crown", "cruise_ship", "cup", "diamond", "dishwasher", "diving_board", "dog", "dolphin",
    "donut", "door", "dragon", "dresser", "drill", "drums", "duck", "dumbbell", "ear", "elbow",
    "elephant", "envelope", "eraser", "eye", "eyeglasses", "face", "fan", "feather", "fence",
    "finger", "fire_hydrant", "fireplace", "firetruck", "fish", "flamingo", "flashlight",
    "flip_flops", "floor_lamp", "flower", "flying_saucer", "foot", "fork", "frog", "frying_pan",
    "garden", "garden_hose", "giraffe", "goatee", "golf_club", "grapes", "grass", "guitar",
    "hamburger", "hammer", "hand", "harp", "hat", "headphones", "hedgehog", "helicopter",
    "helmet", "hexagon", "hockey_puck", "hockey_stick", "horse", "hospital", "hot_air_balloon",
    "hot_dog", "hot_tub", "hourglass", "house", "house_plant", "hurricane", "ice_cream",
    "jacket", "jail", "kangaroo", "key", "keyboard", "knee", "knife", "ladder", "lantern",
    "laptop", "leaf", "leg", "light_bulb", "lighter", "lighthouse", "lightning", "line", "lion",
    "lipstick", "lobster", "lollipop", "mailbox", "map", "marker", "matches", "megaphone",
    "mermaid", "microphone", "microwave", "monkey", "moon", "mosquito", "motorbike", "mountain",
    "mouse", "moustache", "mouth", "mug", "mushroom", "nail", "necklace", "nose", "ocean",
    "octagon", "octopus", "onion", "oven", "owl", "paintbrush", "paint_can", "palm_tree",
    "panda", "pants", "paper_clip", "parachute", "parrot", "passport", "peanut", "pear", "peas",
    "pencil", "penguin", "piano", "pickup_truck", "picture_frame", "pig", "pillow", "pineapple",
    "pizza", "pliers", "police_car", "pond", "pool", "popsicle", "postcard", "potato",
    "power_outlet", "purse", "rabbit", "raccoon", "radio", "rain", "rainbow", "rake",
    "remote_control", "rhinoceros", "rifle", "river", "roller_coaster", "rollerskates",
    "sailboat", "sandwich", "saw", "saxophone", "school_bus", "scissors", "scorpion",
    "screwdriver", "sea_turtle", "see_saw", "shark", "sheep", "shoe", "shorts", "shovel", "sink",
    "skateboard", "skull", "skyscraper", "sleeping_bag", "smiley_face", "snail", "snake",
    "snorkel", "snowflake", "snowman", "soccer_ball", "sock", "speedboat", "spider", "spoon",
    "spreadsheet", "square", "squiggle", "squirrel", "stairs", "star", "steak", "stereo",
    "stethoscope", "stitches", "stop_sign", "stove", "strawberry", "streetlight", "string_bean",
    "submarine", "suitcase", "sun", "swan", "sweater", "swing_set", "sword", "syringe", "table",
    "teapot", "teddy-bear", "telephone", "television", "tennis_racquet", "tent",
    "The_Eiffel_Tower", "The_Great_Wall_of_China", "The_Mona_Lisa", "tiger", "toaster", "toe",
    "toilet", "tooth", "toothbrush", "toothpaste", "tornado", "tractor", "traffic_light", "train",
    "tree", "triangle", "trombone", "truck", "trumpet", "t-shirt", "umbrella", "underwear", "van",
    "vase", "violin", "washing_machine", "watermelon", "waterslide", "whale", "wheel", "windmill",
    "wine_bottle", "wine_glass", "wristwatch", "yoga", "zebra", "zigzag",
)  # fmt: skip
DOMAINNET_COUNTS = {
    "clipart": 48129,
    "infograph": 51605,
    "painting": 72266,
    "quickdraw": 172500,
    "real": 172947,
    "sketch": 69128,
}

# Cityscapes (Cordts et al. 2016): the 19 evaluated classes in train-id order, and the label id
# (gtFine_labelIds.png) of each train id, as cityscapesScripts' helpers/labels.py lists them;
# every other label id is void (255).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# SYNTHIA-RAND-CITYSCAPES: GT/LABELS/*.png hold the SYNTHIA class id in their first channel
# (README.txt of the dataset: 0 void, 1 sky, 2 building, 3 road, 4 sidewalk, 5 fence,
# 6 vegetation, 7 pole, 8 car, 9 traffic sign, 10 pedestrian, 11 bicycle, 12 motorcycle,
# 13 parking-slot, 14 road-work, 15 traffic light, 16 terrain, 17 rider, 18 truck, 19 bus,
# 20 train, 21 wall, 22 lanemarking). SYNTHIA id -> Cityscapes train id as DAFormer's
# tools/convert_datasets/synthia.py and ADVENT/MuHDi's SYNDataSet map them; terrain, truck and
# train do not occur in SYNTHIA-RAND, so the benchmark uses the 16 (or 13) others.
SYNTHIA_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15,
    12: 17, 11: 18,
}  # fmt: skip
#: the Cityscapes train ids of the 16-class benchmark, in train-id order
SYNTHIA_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
#: the 13-class benchmark drops wall, fence and pole (train ids 3, 4, 5)
SYNTHIA_13 = tuple(t for t in SYNTHIA_16 if t not in (3, 4, 5))
#: the Cityscapes train ids kept by the 19-, 16- and 13-class benchmarks (``classes`` of
#: ``cityscapes``, ``gta5`` and ``synthia``), each kept class's index its position here
CITYSCAPES_SUBSETS = {19: tuple(range(19)), 16: SYNTHIA_16, 13: SYNTHIA_13}


@dataclass(frozen=True)
class Preset:
    """One benchmark: its known classes (sorted, or in official label order) and image counts per
    domain, its default folder under ``$HARNESS_DATA``, and where a domain's files are."""

    name: str
    title: str
    folder: str
    classes: tuple[str, ...]
    counts: dict[str, int]
    layout: str
    #: the class folders of a domain below ``root/<domain>`` ("images" for Office-31)
    below: str = ""
    #: official lists: "visda" (root/<domain>/image_list.txt), "domainnet" (root/<domain>_*.txt)
    lists: str = ""


PRESETS = {
    p.name: p
    for p in (
        Preset("office31", "Office-31", "office31", OFFICE31_CLASSES, OFFICE31_COUNTS,
               "root/<domain>/images/<class>/<image>", below="images"),
        Preset("office-home", "Office-Home", "office_home", OFFICE_HOME_CLASSES,
               OFFICE_HOME_COUNTS, "root/<domain>/<class>/<image>"),
        Preset("pacs", "PACS", "PACS", PACS_CLASSES, PACS_COUNTS,
               "root/<domain>/<class>/<image>"),
        Preset("vlcs", "VLCS", "VLCS", VLCS_CLASSES, VLCS_COUNTS,
               "root/<domain>/<class>/<image>"),
        Preset("terra-incognita", "TerraIncognita", "terra_incognita", TERRA_CLASSES,
               TERRA_COUNTS, "root/<domain>/<class>/<image>"),
        Preset("visda2017", "VisDA-2017", "visda2017", VISDA_CLASSES, VISDA_COUNTS,
               "root/<domain>/image_list.txt (lines '<path> <label>')", lists="visda"),
        Preset("domainnet", "DomainNet", "domain_net", DOMAINNET_CLASSES,
               DOMAINNET_COUNTS, "root/<domain>/<class>/<image> and root/<domain>_train.txt, "
               "root/<domain>_test.txt", lists="domainnet"),
    )
}  # fmt: skip
#: folder names a domain is also distributed under (Office-Home's own zip has "Real World")
ALIASES = {("office-home", "Real_World"): ("Real_World", "Real World")}
