"""The built-in corpus: small bilingual text that Velocis writes itself (no download).

Template stories, facts about a small made-up world, arithmetic and short dialogues, in
Chinese and in English, drawn with a seeded random generator: the same seed writes the same
bytes. The text is regular enough that a ~10M-parameter model learns it visibly in a few CPU
minutes (its loss falls far below the unigram entropy), and varied enough that it has to
learn grammar, agreement and sums rather than a handful of sentences.

    zh_path, en_path = write_default_corpus("corpus/")   # ~1.5 MB each, well under a second
"""
from __future__ import annotations

import random
from pathlib import Path

from velocis.utils.atomic import atomic_write_text

# Parallel vocabularies: (English, Chinese).
ANIMALS = [("cat", "猫"), ("dog", "狗"), ("rabbit", "兔子"), ("fox", "狐狸"), ("bird", "小鸟"), ("bear", "熊"),
           ("mouse", "老鼠"), ("horse", "马"), ("duck", "鸭子"), ("tiger", "老虎"), ("panda", "熊猫"), ("frog", "青蛙")]
NAMES = [("Lily", "莉莉"), ("Tom", "汤姆"), ("Mia", "米娅"), ("Ben", "本"), ("Anna", "安娜"), ("Leo", "里奥"),
         ("Sara", "萨拉"), ("Max", "马克斯"), ("Emma", "艾玛"), ("Jack", "杰克"), ("Lucy", "露西"), ("Sam", "山姆")]
ADJECTIVES = [("little", "小小的"), ("happy", "快乐的"), ("brave", "勇敢的"), ("clever", "聪明的"),
              ("sleepy", "困倦的"), ("kind", "善良的"), ("curious", "好奇的"), ("shy", "害羞的")]
PLACES = [("a small forest", "一片小树林里"), ("a big city", "一座大城市里"), ("a quiet village", "一个安静的村庄里"),
          ("a green valley", "一个绿色的山谷里"), ("an old house", "一座老房子里"), ("a sunny garden", "一个阳光明媚的花园里")]
OBJECTS = [("a red ball", "一个红色的球"), ("a shiny key", "一把闪亮的钥匙"), ("an old map", "一张旧地图"),
           ("a blue box", "一个蓝色的盒子"), ("a golden apple", "一个金色的苹果"), ("a tiny boat", "一条小船"),
           ("a warm hat", "一顶暖和的帽子"), ("a magic book", "一本魔法书")]
FEELINGS = [("happy", "很开心"), ("surprised", "很惊讶"), ("excited", "很兴奋"), ("proud", "很自豪")]
ENDINGS = [("From that day on, they were best friends.", "从那天起，他们成了最好的朋友。"),
           ("They laughed and went home together.", "他们笑着一起回家了。"),
           ("It was the best day of the year.", "那是一年中最美好的一天。"),
           ("Then they ate dinner and went to sleep.", "然后他们吃了晚饭，去睡觉了。")]
WEATHER = [("sunny", "晴天"), ("rainy", "下雨"), ("windy", "刮风"), ("snowy", "下雪"), ("cloudy", "多云")]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"), ("black", "黑色")]
FRUITS = [("apple", "苹果"), ("banana", "香蕉"), ("orange", "橙子"), ("pear", "梨"), ("grape", "葡萄"), ("peach", "桃子")]
# A small made-up world with fixed facts: the model can learn them, and we can check it did.
COUNTRIES = [("Aldoria", "阿尔多利亚", "Belmont", "贝尔蒙"), ("Corvania", "科瓦尼亚", "Dunmore", "邓莫尔"),
             ("Estrel", "埃斯特尔", "Fairhaven", "费尔黑文"), ("Galvia", "加尔维亚", "Halden", "哈尔登"),
             ("Istria", "伊斯特里亚", "Jorvik", "约维克"), ("Kelmar", "凯尔玛", "Lunden", "伦登")]
LEGS = [("cat", "猫", 4), ("dog", "狗", 4), ("bird", "小鸟", 2), ("duck", "鸭子", 2), ("horse", "马", 4),
        ("spider", "蜘蛛", 8), ("ant", "蚂蚁", 6), ("fish", "鱼", 0)]
ZH_DIGITS = "零一二三四五六七八九"
EN_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
              "sixteen seventeen eighteen nineteen twenty").split()


def zh_number(n: int) -> str:
    """0..99 in Chinese numerals."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")


def zh_count(n: int) -> str:
    """A number before a measure word: 两 for two (两条腿, not 二条腿)."""
    return "两" if n == 2 else zh_number(n)


def en_number(n: int) -> str:
    return EN_NUMBERS[n] if n < len(EN_NUMBERS) else str(n)


def story(rng: random.Random) -> tuple[str, str]:
    (name_en, name_zh), (animal_en, animal_zh) = rng.choice(NAMES), rng.choice(ANIMALS)
    (adj_en, adj_zh), (place_en, place_zh) = rng.choice(ADJECTIVES), rng.choice(PLACES)
    (obj_en, obj_zh), (feel_en, feel_zh) = rng.choice(OBJECTS), rng.choice(FEELINGS)
    (friend_en, friend_zh), (weather_en, weather_zh) = rng.choice(ANIMALS), rng.choice(WEATHER)
    (end_en, end_zh) = rng.choice(ENDINGS)
    n = rng.randint(2, 9)
    en = (f"Once upon a time, there was a {adj_en} {animal_en} named {name_en}. {name_en} lived in {place_en}. "
          f"One {weather_en} morning, {name_en} found {obj_en}. {name_en} was very {feel_en}. "
          f"{name_en} showed {obj_en} to a {friend_en}. The {friend_en} said, \"Let us play with it!\" "
          f"They played for {en_number(n)} hours. {end_en}")
    zh = (f"从前，有一只{adj_zh}{animal_zh}，名叫{name_zh}。{name_zh}住在{place_zh}。"
          f"一个{weather_zh}的早上，{name_zh}找到了{obj_zh}。{name_zh}{feel_zh}。"
          f"{name_zh}把{obj_zh}给一只{friend_zh}看。{friend_zh}说：“我们一起玩吧！”"
          f"他们玩了{zh_count(n)}个小时。{end_zh}")
    return zh, en


def facts(rng: random.Random) -> tuple[str, str]:
    zh, en = [], []
    for _ in range(rng.randint(3, 6)):
        kind = rng.randrange(4)
        if kind == 0:
            c_en, c_zh, cap_en, cap_zh = rng.choice(COUNTRIES)
            en.append(f"The capital of {c_en} is {cap_en}.")
            zh.append(f"{c_zh}的首都是{cap_zh}。")
        elif kind == 1:
            a_en, a_zh, legs = rng.choice(LEGS)
            en.append(f"A {a_en} has {en_number(legs)} legs." if legs else f"A {a_en} has no legs.")
            zh.append(f"{a_zh}有{zh_count(legs)}条腿。" if legs else f"{a_zh}没有腿。")
        elif kind == 2:
            (f_en, f_zh), (col_en, col_zh) = rng.choice(FRUITS), rng.choice(COLORS)
            n = rng.randint(1, 12)
            en.append(f"There {'is' if n == 1 else 'are'} {en_number(n)} {col_en} {f_en}{'' if n == 1 else 's'} on the table.")
            zh.append(f"桌子上有{zh_count(n)}个{col_zh}的{f_zh}。")
        else:
            (name_en, name_zh), age = rng.choice(NAMES), rng.randint(3, 12)
            en.append(f"{name_en} is {en_number(age)} years old. Next year {name_en} will be {en_number(age + 1)}.")
            zh.append(f"{name_zh}今年{zh_number(age)}岁。明年{name_zh}就{zh_number(age + 1)}岁了。")
    return "".join(zh), " ".join(en)


def arithmetic(rng: random.Random) -> tuple[str, str]:
    zh, en = [], []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(0, 50), rng.randint(0, 49)
        if rng.random() < 0.5:
            en.append(f"{a} + {b} = {a + b}")
            zh.append(f"{a} + {b} = {a + b}，{zh_number(a)}加{zh_number(b)}等于{zh_number(a + b)}。")
        else:
            a, b = max(a, b), min(a, b)
            en.append(f"{a} - {b} = {a - b}")
            zh.append(f"{a} - {b} = {a - b}，{zh_number(a)}减{zh_number(b)}等于{zh_number(a - b)}。")
    return "\n".join(zh), "\n".join(en)


def dialogue(rng: random.Random) -> tuple[str, str]:
    (a_en, a_zh), (b_en, b_zh) = rng.sample(NAMES, 2)
    (f_en, f_zh), n = rng.choice(FRUITS), rng.randint(2, 9)
    (w_en, w_zh) = rng.choice(WEATHER)
    en = (f"{a_en}: Hello, {b_en}! How are you today?\n{b_en}: I am fine, thank you. It is {w_en} today.\n"
          f"{a_en}: Do you want some {f_en}s?\n{b_en}: Yes, please. Can I have {en_number(n)}?\n"
          f"{a_en}: Here you are, {en_number(n)} {f_en}s.\n{b_en}: Thank you, {a_en}!")
    zh = (f"{a_zh}：你好，{b_zh}！你今天好吗？\n{b_zh}：我很好，谢谢。今天是{w_zh}。\n"
          f"{a_zh}：你想吃{f_zh}吗？\n{b_zh}：好的，请给我{zh_count(n)}个。\n"
          f"{a_zh}：给你，{zh_count(n)}个{f_zh}。\n{b_zh}：谢谢你，{a_zh}！")
    return zh, en


KINDS = [(story, 5), (facts, 2), (arithmetic, 2), (dialogue, 2)]


def generate(seed: int = 0, documents: int = 6000) -> tuple[list[str], list[str]]:
    """`documents` (zh, en) document pairs; each pair says the same thing in both languages."""
    rng = random.Random(seed)
    makers = [m for m, weight in KINDS for _ in range(weight)]
    zh, en = [], []
    for _ in range(documents):
        z, e = rng.choice(makers)(rng)
        zh.append(z)
        en.append(e)
    return zh, en


def write_default_corpus(out_dir: str | Path, seed: int = 0, documents: int = 6000) -> tuple[Path, Path]:
    """Write zh.txt and en.txt (documents separated by blank lines) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zh, en = generate(seed, documents)
    zh_path, en_path = out / "zh.txt", out / "en.txt"
    atomic_write_text(zh_path, "\n\n".join(zh) + "\n")
    atomic_write_text(en_path, "\n\n".join(en) + "\n")
    return zh_path, en_path
