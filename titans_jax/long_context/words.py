"""Fixed word lists for S-NIAH keys (adjective-noun pairs, as RULER draws from `wonderwords`).

Real, common English words, lower case, ASCII, no duplicates. Changing these lists changes the
generated examples: bump `GENERATOR_VERSION` in titans_jax.long_context.tasks when you do.
"""

ADJECTIVES = tuple("""
able absent abundant accurate acidic active adorable adventurous afraid agile alert alive
amazing ambitious ancient angry anxious aromatic artistic ashamed astonishing attractive
average awesome awkward bad bashful beautiful bewildered big bitter black bland blue blushing
bold boring brave brief bright brilliant broad broken brown bumpy busy calm capable careful
careless caring cautious charming cheap cheerful chilly chubby civil clean clever cloudy clumsy
cold colorful comfortable common complete complex confident confused cool courageous cozy
crazy creamy creative crisp crooked crowded cruel cuddly curious curly cute damp dangerous dark
dazzling dear decent deep defiant delicate delicious delightful dense determined different
difficult dirty distant dizzy drab dry dull dusty eager early earnest easy elated elderly
elegant empty enchanting energetic enormous entire envious equal even evil exact excellent
excited exotic expensive faint fair faithful famous fancy fantastic far fast fat fearless
feeble fierce filthy fine firm flat fluffy foolish fragile frail frantic free fresh friendly
frightened frozen funny fuzzy gentle giant gifted gigantic glad gleaming glorious golden good
gorgeous graceful grand grateful gray greasy great green grim grumpy guilty handsome happy hard
harsh healthy heavy helpful helpless hidden high hollow honest hopeful horrible hot huge humble
hungry icy ideal idle ill immense important impossible innocent intense jealous jolly joyful
juicy keen kind large late lazy light little lively lonely long loose loud lovely low loyal
lucky lush magnificent majestic massive mature meek mellow messy mighty mild modern modest
moist muddy mysterious narrow nasty natural naughty neat nervous new nice nimble noble noisy
normal nutty obedient odd old open orange ordinary outrageous pale peaceful perfect pink plain
pleasant plump polite poor powerful precious pretty prickly proud puzzled quaint quick quiet
radiant rapid rare raw ready real red relieved remote rich rigid ripe robust rocky rotten rough
round royal rude rusty sad safe salty scary scented secret selfish serene shallow sharp shiny
short shy silent silky silly simple sleepy slim slow small smooth soft solid sour sparkling
spicy splendid spotless square stale steady steep sticky stormy strange strict strong stubborn
sturdy subtle sudden sunny super sweet swift tall tame tart tender tense terrible thick thin
thirsty thoughtful tidy tiny tired tough tranquil tricky true ugly unique unusual upset useful
vast velvet vibrant vigilant violet vivid warm wary weak wealthy weary wet white whole wicked
wide wild windy wise witty wonderful wooden worried yellow young zany zealous
""".split())

NOUNS = tuple("""
acorn actor airport album anchor angle animal ankle answer apple apron arch arrow artist
attic avenue baby bakery balcony balloon banana band bank barn basket bath beach beard bed bee
bell belt bench berry bicycle bird blanket blossom boat body book boot bottle boulder bowl box
branch bread bridge brother brush bucket building bus butter button cabin cactus cake camera
camp candle canoe canyon car card carpet carrot castle cat cave ceiling cellar chair chalk
cheese cherry chest chicken child chimney church circle city cliff clock cloud coast coat
coffee coin comet cookie copper corn cottage cotton country cousin cow crab crayon creek crow
crown cup curtain cushion daisy dancer desert desk diamond dinner doctor dog doll dolphin door
dragon drawer dream dress drum duck eagle earth egg elbow elephant engine evening fabric face
factory falcon farm feather fence field finger fire fish flag flame flower flute fog forest
fork fountain fox frog fruit garden gate ghost giraffe glass glove goat gold grape grass guitar
hammer harbor hat hawk heart helmet hill honey horse hospital house ice island jacket jar jelly
jewel journey kettle key king kitchen kite kitten knife ladder lake lamp lantern leaf lemon
letter library lighthouse lion lizard lock machine magnet map marble market meadow melon
mirror monkey moon morning mountain mouse mushroom needle nest night notebook oak ocean office
onion orchard owl painter palace pancake paper parade parrot pasta path peach pear pearl
pebble pencil penguin pepper piano picture pie pillow pilot pine planet plate plum pocket
poet pond potato pumpkin puppy queen quilt rabbit radio railway rain rainbow raven ribbon
river road robin rock rocket roof room rope rose sailor salad sand saucer school scissors sea
seed shadow sheep shell ship shoe shop shovel silver singer sister skirt sky snail snake snow
soap sock soup spider spoon spring squirrel stable star station stone storm stove street
student sugar summer sun swan sweater table tail teacher temple tent thunder ticket tiger
timber toast tomato tower town toy tractor train tree truck trumpet tulip tunnel turtle
umbrella valley vase village violin volcano wagon wall walnut wand water wave whale wheat
wheel whistle willow window wind wing winter wizard wolf wood yard zebra
""".split())

assert len(set(ADJECTIVES)) == len(ADJECTIVES) and len(set(NOUNS)) == len(NOUNS)
