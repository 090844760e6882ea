#!/usr/bin/env python3
"""Writes train.jsonl and eval.jsonl: chats that teach a model to answer from
numbered passages and cite them, in exactly the prompt `engine ask` builds
(src/rag/answer.rs, messages()).

Every example is a system instruction, a user turn with 2 (sometimes 3)
passages laid out as "[n] (source)\\ntext" and a question, and a short
assistant answer that states the fact and cites the passage: "... [2]." The
answer is in passage 1, 2 or 3; the other passages are neighbouring sections
of the same document or of the organisation's other documents (related, but
without the answer); and about one example in eight has the answer in no
passage: "I do not know: the passages do not say."

The organisations, people, products, figures and policies are invented here
from the word lists below, and none comes from examples/quillmark-kb (the
evaluation set): the script refuses to write an example that mentions one of
its names or key figures. Deterministic (fixed seed), stdlib only:

    python3 examples/cite/make_data.py          # writes examples/cite/{train,eval}.jsonl
"""

import json
import os
import random
import re
import textwrap

SEED = 6
N_TRAIN = 240
N_EVAL = 24
MAX_CHARS = 580  # passages + question + answer; under 288 tokens with the system prompt

# Must be exactly the system text of src/rag/answer.rs::messages().
SYSTEM = (
    "Answer the question using only the numbered passages. After each fact, "
    "cite the passage it comes from as [1], [2], and so on. If the passages do "
    "not contain the answer, say that you do not know."
)
UNKNOWN = "I do not know: the passages do not say."

# Names and figures of the evaluation knowledge base: never in the training data.
FORBIDDEN = [
    "quillmark", "tern", "kestrel", "heron", "quillos", "alder", "birch",
    "ledgerly", "skylark", "helpdeck", "tampere", "brno", "lehtonen", "svoboda",
    "aino", "marek", "munich", "tier-1", "€180", "€130", "48.2", "41.2",
    "€63 million", "7.5 kg", "1,100 mm", "10 hours", "90 minutes",
    "november 2026", "8 hours", "30 days", "90 days", "two days a week",
    "€600", "2,400", "24 months", "18 months", "in 2017", "home-office",
    "business class", "priority support",
]

FORBIDDEN_RE = re.compile("|".join(
    (r"\b" + re.escape(f) + r"\b") if f[0].isalpha() else re.escape(f) for f in FORBIDDEN))

# ---------------------------------------------------------------- word lists

ORGS = [
    "Brightwater Analytics", "Corvane Foods", "Lindqvist Marine", "Oakhollow Software",
    "Pellucid Optics", "Saltmarsh Energy", "Vantor Logistics", "Marisco Textiles",
    "Tidewell Health", "Glenrock Brewing", "Northgate Insurance", "Halvard Tools",
    "Fernhill Pharma", "Copperleaf Bank", "Riverbend Studios", "Stonecrop Farms",
    "Ashgrove Printing", "Bellwether Labs", "Caldera Geothermal", "Driftwood Furniture",
    "Embervale Ceramics", "Foxglove Cosmetics", "Granite Peak Outdoor", "Harbourline Ferries",
    "Ironbark Construction", "Juniper Payments", "Kingsmoor Hotels", "Larkspur Education",
    "Meridian Water", "Nettlefield Seeds", "Orchard Lane Bakery", "Pinecrest Clinics",
    "Quayside Media", "Redwater Chemicals", "Silverbirch Audio", "Thornbury Cycles",
    "Upland Dairy", "Velora Mobility", "Westmere Paper", "Yarrow Games",
    "Zephyr Wind Systems", "Blackthorn Security", "Clearbrook Labs", "Duneview Solar",
    "Eastholm Shipping", "Fallowfield Grain", "Greywell Pumps", "Hollybush Toys",
]
CITIES = [
    ("Lyon", "France"), ("Porto", "Portugal"), ("Gdańsk", "Poland"), ("Leeds", "the UK"),
    ("Ghent", "Belgium"), ("Bilbao", "Spain"), ("Aarhus", "Denmark"), ("Graz", "Austria"),
    ("Turin", "Italy"), ("Cork", "Ireland"), ("Utrecht", "the Netherlands"),
    ("Tallinn", "Estonia"), ("Kraków", "Poland"), ("Lille", "France"), ("Bergen", "Norway"),
    ("Malmö", "Sweden"), ("Vilnius", "Lithuania"), ("Seville", "Spain"),
    ("Rotterdam", "the Netherlands"), ("Bologna", "Italy"),
    ("Toulouse", "France"), ("Edinburgh", "the UK"), ("Linz", "Austria"),
    ("Riga", "Latvia"), ("Oulu", "Finland"), ("Ljubljana", "Slovenia"),
    ("Valencia", "Spain"), ("Odense", "Denmark"), ("Basel", "Switzerland"),
    ("Nantes", "France"), ("Bristol", "the UK"), ("Göteborg", "Sweden"),
    ("Poznań", "Poland"), ("Eindhoven", "the Netherlands"), ("Salzburg", "Austria"),
]
FIRST = [
    "Ines", "Tomas", "Leena", "Rafael", "Greta", "Omar", "Selma", "Viktor", "Nadia",
    "Jonas", "Clara", "Mateo", "Freya", "Pavel", "Ingrid", "Luca", "Amira", "Henrik",
    "Zofia", "Daniel", "Elif", "Bruno", "Hanna", "Kofi", "Marta", "Sven", "Lucía",
    "Emil", "Priya", "Anton", "Noor", "Felix", "Ilse", "Jakub", "Rosa", "Tariq",
]
LAST = [
    "Moreau", "Kowalski", "Andersen", "Ferreira", "Lindgren", "Haddad", "Novak",
    "Van Dijk", "O'Brien", "Rossi", "Eriksen", "Schneider", "Garcia", "Petrov",
    "Nieminen", "Costa", "Brennan", "Horvat", "Jansen", "Dubois", "Kaya", "Larsen",
    "Mendes", "Okafor", "Pereira", "Quinn", "Ruiz", "Sørensen", "Toivonen", "Weber",
]
ROLES = [("CEO", "chief executive"), ("CTO", "chief technology officer"),
         ("COO", "chief operating officer"), ("CFO", "chief financial officer")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
CURRENCIES = ["€", "€", "€", "£", "$"]
FAMILIES = ["Vega", "Quartz", "Rowan", "Basalt", "Altair", "Cobalt", "Juno", "Onyx",
            "Sable", "Lumen", "Talon", "Cirrus", "Atlas", "Nimbus", "Orion", "Flint",
            "Maple", "Zenith", "Pico", "Halo", "Ember", "Drift", "Polar", "Echo"]
APPS = ["Expensa", "Rostr", "Ticketry", "Leavely", "Deskbook", "Payrix", "Visitly",
        "Parkwise", "Learnhub", "Buyflow", "Fleetly", "Shiftboard"]
DEPTS = ["customer service", "product design", "logistics", "quality assurance",
         "marketing", "field service", "research", "procurement", "IT", "legal affairs"]

# Product kinds: what a model is, and its main specification as
# (phrase in the text, questions, answer), each a function of the name and a value.
KINDS = [
    ("cargo e-bike", lambda r: r.choice([45, 55, 60, 70, 85, 95, 110]),
     "a range of {v} km on one battery",
     ["How far can the {p} ride on one battery?", "What is the range of the {p}?"],
     "The {p} has a range of {v} km on one battery"),
    ("camera drone", lambda r: r.choice([22, 27, 31, 34, 38, 41, 46]),
     "a flight time of {v} minutes",
     ["How long can the {p} fly?", "What is the flight time of the {p}?"],
     "The {p} flies for {v} minutes"),
    ("industrial dryer", lambda r: r.choice([12, 18, 24, 32, 40, 55]),
     "a drum of {v} kg of laundry",
     ["How much laundry does the {p} take?", "What is the drum capacity of the {p}?"],
     "The {p} takes {v} kg of laundry"),
    ("label printer", lambda r: r.choice([140, 180, 220, 260, 310, 350]),
     "a print speed of {v} mm per second",
     ["How fast does the {p} print?", "What is the print speed of the {p}?"],
     "The {p} prints {v} mm per second"),
    ("heat pump", lambda r: r.choice([6, 8, 11, 14, 16, 19]),
     "a heating output of {v} kW",
     ["What heating output does the {p} have?", "How powerful is the {p}?"],
     "The {p} has a heating output of {v} kW"),
    ("espresso machine", lambda r: r.choice([2, 3, 4, 6]),
     "{v} brew groups",
     ["How many brew groups does the {p} have?"],
     "The {p} has {v} brew groups"),
    ("handheld scanner", lambda r: r.choice([9, 11, 12, 14, 16, 20]),
     "a battery that lasts {v} hours of scanning",
     ["How long does the {p}'s battery last?", "How many hours does the {p} scan on one charge?"],
     "The {p}'s battery lasts {v} hours of scanning"),
    ("solar inverter", lambda r: r.choice([3, 5, 8, 10, 12, 15, 20]),
     "a rated power of {v} kW",
     ["What is the rated power of the {p}?", "How much power does the {p} handle?"],
     "The {p} has a rated power of {v} kW"),
    ("electric forklift", lambda r: r.choice([1200, 1600, 2000, 2500, 3200]),
     "a lifting capacity of {v:,} kg",
     ["How much can the {p} lift?", "What is the lifting capacity of the {p}?"],
     "The {p} lifts up to {v:,} kg"),
    ("water purifier", lambda r: r.choice([40, 75, 120, 200, 350]),
     "an output of {v} litres per hour",
     ["How much water does the {p} purify per hour?", "What is the output of the {p}?"],
     "The {p} purifies {v} litres per hour"),
    ("3D printer", lambda r: r.choice([220, 250, 300, 350, 400]),
     "a build volume of {v} mm on each side",
     ["How large is the build volume of the {p}?", "What build volume does the {p} have?"],
     "The {p} has a build volume of {v} mm on each side"),
    ("wind turbine", lambda r: r.choice([45, 60, 80, 100, 150]),
     "a rated output of {v} kW",
     ["What is the rated output of the {p}?", "How much power does the {p} produce?"],
     "The {p} has a rated output of {v} kW"),
]


def money(r, cur, lo, hi, step=1):
    """A price like €1,250."""
    v = r.randrange(lo, hi, step)
    return f"{cur}{v:,}"


def millions(r, cur, lo, hi):
    v = round(r.uniform(lo, hi), 1)
    return v, f"{cur}{v} million"


def person(r, used):
    while True:
        name = f"{r.choice(FIRST)} {r.choice(LAST)}"
        if name not in used:
            used.add(name)
            return name


# ---------------------------------------------------------------- documents
#
# A document is a title, an intro and sections; a section is a heading, its
# paragraphs (or list items) and its facts: (questions, answer without the
# citation). Each generator returns (slug, title, intro, sections).


def sec(heading, paras, facts, level=2):
    return {"heading": heading, "paras": paras, "facts": facts, "level": level}


def company(r, o):
    org, used = o["name"], o["people"]
    year = r.randrange(1994, 2016)
    (r1, r1long), (r2, r2long) = r.sample(ROLES[:3], 2)
    p1, p2 = person(r, used), person(r, used)
    why = r.choice(["after both left a shipping software firm",
                    "in a rented garage", "with a grant from the regional council",
                    "after selling their first start-up", "as a university spin-off"])
    hq, hqc = o["hq"]
    func = r.choice(["design", "support", "engineering", "logistics", "customer service", "research"])
    n = r.randrange(12, 140)
    opened = r.randrange(year + 1, 2025)
    cities = r.sample([c for c in CITIES if c[0] != hq], 3)
    sites = [("Headquarters", (hq, hqc), f"opened in {opened}", "{org}'s headquarters"),
             (f"{func.capitalize()} office", cities[0], f"with {n} people", "The {k}"),
             ("Warehouse", cities[1], f"{r.randrange(2, 40) * 500:,} m²", "The warehouse"),
             (r.choice(["Test lab", "Training centre", "Repair shop", "Data centre"]), cities[2],
              f"since {r.randrange(year + 1, 2026)}", "The {k}")]
    sites = [(k, c, e, a.replace("{org}", org)) for k, c, e, a in sites[:1] + r.sample(sites[1:], r.choice([2, 3]))]
    site_qs = ["Where is {org}'s {k}?", "Where is the {k}?", "In which city is the {k}?"]
    cfo, lead = person(r, used), person(r, used)
    dept = r.choice(DEPTS)
    since = r.randrange(2012, 2026)
    customers, countries = r.randrange(40, 4000), r.randrange(3, 40)
    market = r.choice([c[1] for c in CITIES if c[1] not in (hqc,)])
    sections = [
        sec("Founders",
            [f"{org} was founded in {year} by {p1}, its {r1}, and {p2}, its {r2}, {why}."],
            [(["Who founded {org}?", "Who are the founders of {org}?", "Who started {org}?"],
              f"{org} was founded by {p1} ({r1}) and {p2} ({r2}) in {year}"),
             (["When was {org} founded?", "In which year was {org} founded?"],
              f"{org} was founded in {year}")]),
        sec("Offices", [f"- {k}: {c}, {cc}, {extra}." for k, (c, cc), extra, _ in sites],
            [([q.replace("{k}", k.lower()) for q in site_qs], f"{a.replace('{k}', k.lower())} is in {c}, {cc}, {extra}")
             for k, (c, cc), extra, a in sites]),
        sec("Management",
            [f"{cfo} has been the chief financial officer since {since}. {lead} leads "
             f"{dept} and reports to the {r1}."],
            [(["Who is {org}'s chief financial officer?", "Who is the CFO of {org}?"],
              f"{cfo} has been the chief financial officer since {since}"),
             ([f"Who leads {dept} at {{org}}?", f"Who is in charge of {dept}?"],
              f"{lead} leads {dept}")]),
        sec("Customers",
            [f"{org} serves {customers:,} customers in {countries} countries. Its largest "
             f"market is {market}."],
            [(["How many customers does {org} have?", "How many customers does {org} serve?"],
              f"{org} serves {customers:,} customers in {countries} countries"),
             (["What is {org}'s largest market?", "Which market is the largest for {org}?"],
              f"{org}'s largest market is {market}")]),
    ]
    intro = f"{org} makes {o['what']}. This page is the short version of our story."
    return "company", f"About {org}", intro, sections


def results(r, o):
    org, cur = o["name"], o["cur"]
    year = r.randrange(2019, 2026)
    q = r.randrange(1, 5)
    period = f"Q{q} {year}"
    ordinal = ["first", "second", "third", "fourth"][q - 1]
    rev, revs = millions(r, cur, 5, 240)
    g = r.randrange(3, 31)
    prev = f"{cur}{round(rev / (1 + g / 100), 1)} million"
    gm = round(r.uniform(18, 62), 1)
    op = f"{cur}{round(rev * r.uniform(0.04, 0.18), 1)} million"
    cash = f"{cur}{round(rev * r.uniform(0.2, 0.9), 1)} million"
    orders = f"{cur}{round(rev * r.uniform(0.9, 1.6), 1)} million"
    h0 = r.randrange(40, 2000)
    h1 = h0 + r.randrange(-15, 90)
    nq, ny = (q % 4) + 1, year + (q == 4)
    lo = round(rev * r.uniform(1.0, 1.1))
    hi = lo + r.randrange(2, 9)
    sections = [
        sec("Headline figures",
            [f"{org} closed the {ordinal} quarter of {year} with revenue of **{revs}**, "
             f"up {g}% from {prev} a year earlier. Gross margin was {gm}%."],
            [([f"What was {{org}}'s revenue in {period}?", f"How much revenue did {{org}} make in {period}?",
               f"What were {{org}}'s sales in {period}?"],
              f"Revenue in {period} was {revs}, up {g}% from {prev}"),
             ([f"What was {{org}}'s gross margin in {period}?", "What was the gross margin?"],
              f"The gross margin was {gm}%")]),
        sec("Profit and cash",
            [f"Operating profit was {op}. Net cash at the end of the quarter stood at {cash}."],
            [([f"What was {{org}}'s operating profit in {period}?", "How large was the operating profit?"],
              f"Operating profit was {op}"),
             ([f"How much net cash did {{org}} have at the end of {period}?", "How much cash does {org} hold?"],
              f"Net cash at the end of the quarter was {cash}")]),
        sec("Orders and people",
            [f"Order intake in the quarter was {orders}. Headcount went from {h0:,} to "
             f"{h1:,} people."],
            [([f"What was {{org}}'s order intake in {period}?", "How many orders came in during the quarter?"],
              f"Order intake was {orders}"),
             (["How many people does {org} employ?", f"What was {{org}}'s headcount at the end of {period}?"],
              f"{org} employs {h1:,} people, up from {h0:,}")]),
        sec("Outlook",
            [f"For Q{nq} {ny} the board expects revenue between {cur}{lo} and {cur}{hi} million."],
            [([f"What revenue does {{org}} expect for Q{nq} {ny}?", "What is the revenue outlook for the next quarter?"],
              f"The board expects revenue between {cur}{lo} and {cur}{hi} million in Q{nq} {ny}")]),
    ]
    intro = f"Internal summary for all staff. Figures are unaudited and in {dict(zip('€£$', ['euros', 'pounds', 'dollars']))[cur]}."
    return f"q{q}-{year}-results", f"{org} — {period} results", intro, sections


def products(r, o):
    org, cur = o["name"], o["cur"]
    fam = o["family"]
    kind, val, phrase, qs, ans = o["kind"]
    nums = sorted(r.sample([2, 3, 4, 5, 6, 8, 9, 10, 12, 20], 3))
    sections = []
    adjs = ["entry model", "mid-range model", "flagship", "compact model", "heavy-duty model"]
    for i, n in enumerate(nums[: r.choice([2, 3])]):
        p = f"{fam} {n}" if r.random() < 0.5 else f"{fam}-{n}"
        v = val(r)
        w = round(r.uniform(0.8, 90), 1)
        price = money(r, cur, 300, 40000, 50)
        adj = adjs[i] if i < 2 else r.choice(adjs[2:])
        ip, made = r.choice([44, 54, 55, 65, 66, 68]), r.choice(CITIES)[0]
        more = r.choice([f" It is rated IP{ip}.", f" It is assembled in {made}.", ""])
        sections.append(sec(
            p,
            [f"The {p} is the {adj}, with {phrase.format(v=v)}. It weighs {w} kg.{more} "
             f"List price: {price}."],
            [([x.format(p=p) for x in qs], ans.format(p=p, v=v)),
             ([f"What IP rating does the {p} have?", f"How well is the {p} sealed?"],
              f"The {p} is rated IP{ip}") if "IP" in more else
             ([f"Where is the {p} assembled?", f"Where is the {p} made?"], f"The {p} is assembled in {made}")
             if "assembled" in more else
             ([f"How much does the {p} weigh?"], f"The {p} weighs {w} kg"),
             ([f"How much does the {p} weigh?", f"What is the weight of the {p}?"],
              f"The {p} weighs {w} kg"),
             ([f"How much does the {p} cost?", f"What is the list price of the {p}?"],
              f"The {p} costs {price}")],
            level=3))
    n_new = r.choice([x for x in range(14, 40) if x not in nums])
    newp = f"{fam} {n_new}"
    m, y = r.choice(MONTHS), r.randrange(2024, 2029)
    country = r.choice(CITIES)[1]
    sections.append(sec(
        "Coming next",
        [r.choice([f"The {newp} goes on sale in {m} {y}, first in {country}.",
                   f"The {newp} is the next model. First deliveries to customers in {country}: {m} {y}.",
                   f"The {newp} reaches the first customers in {country} in {m} {y}."])
         + f" Pre-orders open {r.choice(['six', 'eight', 'ten', 'twelve'])} weeks earlier."],
        [([f"When does the {newp} go on sale?", f"When will the {newp} be available?",
           f"When can customers buy the {newp}?", f"When is the {newp} released?",
           f"When do deliveries of the {newp} start?"],
          f"The {newp} reaches its first customers in {country} in {m} {y}")]))
    intro = f"{fam} {kind}s are designed and built by {org}. Prices exclude VAT."
    return "products", f"{fam} product range ({r.randrange(2023, 2027)})", intro, sections


def leave(r, o):
    days, carry = r.randrange(22, 31), r.randrange(3, 11)
    by = r.choice(MONTHS[2:6])
    weeks, within = r.randrange(6, 27), r.choice([12, 15, 36])
    sick_t, note = r.choice(["9:00", "9:30", "10:00", "8:30"]), r.randrange(3, 8)
    app, ahead = r.choice(APPS), r.randrange(2, 21)
    sections = [
        sec("Annual leave",
            [f"Full-time staff get {days} days of paid leave a year, plus public holidays. "
             f"Up to {carry} unused days may be carried over, and must be taken by the end of {by}."],
            [(["How many days of paid leave do employees get?", "How much annual leave do full-time staff get?"],
              f"Full-time staff get {days} days of paid leave a year, plus public holidays"),
             (["How many unused leave days can be carried over?", "Can unused leave be carried over?"],
              f"Up to {carry} unused days may be carried over, to be taken by the end of {by}")]),
        sec("Parental leave",
            [f"Either parent gets {weeks} weeks of parental leave at full pay, to be taken "
             f"within {within} months of the birth or adoption."],
            [(["How long is parental leave?", "How many weeks of parental leave at full pay are there?"],
              f"Either parent gets {weeks} weeks of parental leave at full pay")]),
        sec("Sick leave",
            [f"Tell your manager before {sick_t} on the first day you are ill. A doctor's "
             f"note is needed from day {note}."],
            [(["When is a doctor's note needed for sick leave?", "From which day of illness is a doctor's note required?"],
              f"A doctor's note is needed from day {note} of an illness"),
             (["By what time must I report being sick?", "When do I have to tell my manager that I am ill?"],
              f"Tell your manager before {sick_t} on the first day you are ill")]),
        sec("Requesting leave",
            [f"Request leave in {app} at least {ahead} days ahead. Managers answer within "
             f"three working days."],
            [(["How far ahead must leave be requested?", "Where do I request leave?"],
              f"Request leave in {app} at least {ahead} days ahead")]),
    ]
    return "leave-policy", "Leave policy", f"Applies to all employees of {o['name']}.", sections


def security(r, o):
    n = r.choice([10, 12, 14, 16])
    mfa = r.choice(["Authy", "a YubiKey", "the Okta Verify app", "a hardware token"])
    hrs = r.choice([1, 2, 4, 12, 24])
    phone = f"+{r.randrange(30, 49)} {r.randrange(10, 99)} {r.randrange(100, 999)} {r.randrange(1000, 9999)}"
    keep = r.choice([14, 21, 35, 60, 180])
    t = r.choice(["01:00", "02:30", "03:00", "23:30"])
    sections = [
        sec("Passwords",
            [f"Passwords have at least {n} characters. Sign-in to every company system "
             f"needs a second factor: {mfa}."],
            [(["How long must passwords be?", "What is the minimum password length?"],
              f"Passwords must have at least {n} characters"),
             (["What second factor is used to sign in?", "What is used for two-factor sign-in?"],
              f"Sign-in needs a second factor: {mfa}")]),
        sec("Lost devices",
            [f"Report a lost or stolen laptop or phone within {hrs} hour{'s' if hrs > 1 else ''} "
             f"to the IT desk on {phone}."],
            [(["How quickly must a lost laptop be reported?", "What do I do if my laptop is stolen?"],
              f"Report it within {hrs} hour{'s' if hrs > 1 else ''} to the IT desk on {phone}"),
             (["What is the IT desk's phone number?"], f"The IT desk's number is {phone}")]),
        sec("Backups",
            [f"File servers are backed up every night at {t}. Backups are kept for {keep} days."],
            [(["How long are backups kept?", "For how many days are backups kept?"],
              f"Backups are kept for {keep} days"),
             (["When are the backups made?", "At what time are the servers backed up?"],
              f"File servers are backed up every night at {t}")]),
    ]
    return "it-security", "IT security rules", f"{o['name']} rules for every laptop, phone and account.", sections


def service(r, o):
    cur = o["cur"]
    basic, plus = r.choice([("Basic", "Plus"), ("Essential", "Premium"), ("Standard", "Gold"), ("Core", "Pro")])
    price = money(r, cur, 300, 9000, 50)
    resp = r.choice([2, 3, 6, 12])
    days = r.choice([14, 21, 45, 60])
    fee = r.choice([8, 10, 12, 15, 20])
    repair = r.randrange(3, 15)
    city = o["hq"][0]
    sections = [
        sec("Service plans",
            [f"Every customer gets the {basic} plan: email answers within three working days.",
             f"The {plus} plan costs {price} per site per year: a phone line and a first "
             f"response within {resp} hours."],
            [([f"How much does the {plus} plan cost?", f"What is the price of the {plus} plan?"],
              f"The {plus} plan costs {price} per site per year"),
             ([f"How fast is the first response on the {plus} plan?"],
              f"The {plus} plan gives a first response within {resp} hours")]),
        sec("Returns",
            [f"Unused goods may be returned within {days} days of delivery for a refund, "
             f"minus a {fee}% handling fee."],
            [(["How long do customers have to return goods?", "Within how many days can a customer return an item?"],
              f"Unused goods may be returned within {days} days of delivery"),
             (["How large is the handling fee on returns?"], f"Returns carry a {fee}% handling fee")]),
        sec("Repairs",
            [f"Repairs are done at our {city} workshop and take {repair} working days. "
             f"Shipping to the workshop is free."],
            [(["How long does a repair take?", "Where are repairs done?"],
              f"Repairs take {repair} working days at the {city} workshop")]),
    ]
    return "customer-service", "Customer service guide", "", sections


def facilities(r, o):
    city = o["hq"][0]
    h1, h2 = r.choice(["7:00", "7:30", "8:00"]), r.choice(["18:00", "19:00", "20:00", "21:00"])
    spaces, ev = r.randrange(30, 300), r.randrange(4, 30)
    app = r.choice(APPS)
    lunch = f"{o['cur']}{r.randrange(4, 9)}.{r.choice(['00', '50', '20', '80'])}"
    hrs = r.choice([12, 24, 48])
    sections = [
        sec("Opening hours",
            [f"The {city} office is open from {h1} to {h2} on weekdays. It is closed at weekends."],
            [([f"When is the {city} office open?", "What are the office opening hours?"],
              f"The {city} office is open from {h1} to {h2} on weekdays")]),
        sec("Parking",
            [f"There are {spaces} parking spaces, {ev} of them with electric chargers. Book a "
             f"space in {app}."],
            [(["How many parking spaces are there?", "How many parking spaces have chargers?"],
              f"There are {spaces} parking spaces, {ev} of them with electric chargers")]),
        sec("Canteen",
            [f"Lunch is served from 11:30 to 13:30 and costs {lunch} for staff."],
            [(["How much does lunch cost?", "What does lunch in the canteen cost?"],
              f"Lunch costs {lunch} for staff")]),
        sec("Visitors",
            [f"Register visitors at reception at least {hrs} hours ahead. Visitors wear a "
             f"badge at all times."],
            [(["How early must visitors be registered?", "When must I register a visitor?"],
              f"Visitors must be registered at least {hrs} hours ahead")]),
    ]
    return "office-guide", f"{city} office guide", "", sections


def project(r, o):
    used, cur = o["people"], o["cur"]
    name = r.choice(["Lighthouse", "Bluebell", "Granite", "Northstar", "Compass", "Keystone",
                     "Riverside", "Sundial", "Waypoint", "Horizon"])
    y = r.randrange(2023, 2027)
    m1, m2 = r.sample(MONTHS, 2)
    city = r.choice(CITIES)[0]
    budget = f"{cur}{round(r.uniform(0.3, 12), 1)} million"
    hw = r.randrange(20, 70)
    lead, test = person(r, used), person(r, used)
    rq = r.randrange(1, 5)
    sections = [
        sec("Milestones",
            [f"Project {name} started in {m1} {y}. The pilot in {city} runs until {m2} {y + 1}; "
             f"the full roll-out is planned for Q{rq} {y + 2}."],
            [([f"When did project {name} start?", f"When did the {name} project begin?"],
              f"Project {name} started in {m1} {y}"),
             ([f"When is the {name} roll-out planned?", f"When will {name} be rolled out?"],
              f"The full roll-out is planned for Q{rq} {y + 2}"),
             ([f"Where is the {name} pilot?", f"Until when does the {name} pilot run?"],
              f"The pilot runs in {city} until {m2} {y + 1}")]),
        sec("Budget",
            [f"The budget of project {name} is {budget}, {hw}% of it for hardware."],
            [([f"What is the budget of project {name}?", f"How much money does {name} have?"],
              f"The budget of project {name} is {budget}")]),
        sec("Team",
            [f"{lead} is the project lead. {test} owns testing and the pilot."],
            [([f"Who leads project {name}?", f"Who is the {name} project lead?"],
              f"{lead} is the project lead"),
             ([f"Who is responsible for testing in project {name}?"], f"{test} owns testing and the pilot")]),
    ]
    return f"project-{name.lower()}", f"Project {name}", "", sections


def purchasing(r, o):
    cur = o["cur"]
    lim = money(r, cur, 1000, 20000, 500)
    role = r.choice(["finance director", "COO", "head of procurement", "managing director"])
    pay = r.choice([14, 21, 45, 60])
    card = money(r, cur, 500, 6000, 250)
    quotes = r.choice([2, 3])
    over = money(r, cur, 20000, 80000, 5000)
    sections = [
        sec("Approval limits",
            [f"Managers approve purchases up to {lim}. Above that the {role} signs as well."],
            [(["Up to what amount can managers approve purchases?", "Who must approve large purchases?"],
              f"Managers approve purchases up to {lim}; above that the {role} signs as well")]),
        sec("Quotes",
            [f"Purchases over {over} need {quotes} written quotes from different suppliers."],
            [(["When are written quotes needed?", "How many quotes does a large purchase need?"],
              f"Purchases over {over} need {quotes} written quotes")]),
        sec("Paying suppliers",
            [f"Supplier invoices are paid within {pay} days of receipt, by bank transfer only."],
            [(["When are supplier invoices paid?", "How quickly does the company pay its suppliers?"],
              f"Supplier invoices are paid within {pay} days of receipt")]),
        sec("Company cards",
            [f"Company cards have a monthly limit of {card}. Cash withdrawals are blocked."],
            [(["What is the monthly limit on a company card?", "Can I withdraw cash with a company card?"],
              f"Company cards have a monthly limit of {card}; cash withdrawals are blocked")]),
    ]
    return "purchasing", "Purchasing and payments", f"How {o['name']} buys and pays.", sections


def learning(r, o):
    cur = o["cur"]
    budget = money(r, cur, 400, 3000, 50)
    weeks = r.randrange(3, 9)
    mentor = r.choice([3, 4, 6, 9, 12])
    app = r.choice(APPS)
    sections = [
        sec("Learning budget",
            [f"Each employee has {budget} a year for courses, books and exam fees. Unused "
             f"budget does not roll over."],
            [(["How large is the learning budget?", "How much can I spend on courses each year?"],
              f"Each employee has {budget} a year for courses, books and exam fees"),
             (["Does unused learning budget roll over?"], "No, unused learning budget does not roll over")]),
        sec("Conferences",
            [f"Staff may attend one conference abroad per year. Send the request in {app} "
             f"{weeks} weeks before the event."],
            [(["How many conferences abroad may staff attend?", "How early must a conference request be sent?"],
              f"Staff may attend one conference abroad per year, requested in {app} {weeks} weeks ahead")]),
        sec("Mentoring",
            [f"Every new hire has a mentor for the first {mentor} months."],
            [(["How long do new hires have a mentor?", "Do new employees get a mentor?"],
              f"New hires have a mentor for the first {mentor} months")]),
    ]
    return "learning", "Learning and development", "", sections


def fleet(r, o):
    cur = o["cur"]
    rate = f"{cur}0.{r.randrange(19, 48)}"
    years, km = r.choice([3, 4, 5]), r.choice([90000, 120000, 150000, 180000])
    app = r.choice(APPS)
    sections = [
        sec("Private cars",
            [f"Business trips in a private car are reimbursed at {rate} per km. Parking "
             f"fines are not reimbursed."],
            [(["What is the mileage rate for private cars?", "How much is paid per km for a private car?"],
              f"Trips in a private car are reimbursed at {rate} per km"),
             (["Are parking fines reimbursed?"], "No, parking fines are not reimbursed")]),
        sec("Company cars",
            [f"Company cars are replaced after {years} years or {km:,} km, whichever comes "
             f"first. Book a pool car in {app}."],
            [(["When are company cars replaced?", "How often are company cars replaced?"],
              f"Company cars are replaced after {years} years or {km:,} km, whichever comes first"),
             (["How do I book a pool car?"], f"Pool cars are booked in {app}")]),
    ]
    return "vehicles", "Vehicle policy", "", sections


def employment(r, o):
    prob = r.choice([3, 4, 6])
    notice = r.choice(["one month", "two months", "three months", "six weeks"])
    payday = r.choice([15, 20, 25, 28])
    app = r.choice(APPS)
    hours = r.choice([35, 36, 37.5, 38, 40])
    sections = [
        sec("Probation and notice",
            [f"New employees have a probation period of {prob} months. After it, the notice "
             f"period is {notice} on both sides."],
            [(["How long is the probation period?", "How long does probation last?"],
              f"The probation period is {prob} months"),
             (["What is the notice period?", "How much notice must an employee give?"],
              f"The notice period is {notice} on both sides")]),
        sec("Pay",
            [f"Salaries are paid on the {payday}th of each month. Payslips are in {app}."],
            [(["When are salaries paid?", "On which day is payday?"],
              f"Salaries are paid on the {payday}th of each month")]),
        sec("Working hours",
            [f"A full-time week is {hours} hours. Overtime is compensated with time off."],
            [(["How many hours is a full-time week?", "What are the weekly working hours?"],
              f"A full-time week is {hours} hours"),
             (["How is overtime compensated?"], "Overtime is compensated with time off")]),
    ]
    return "employment-terms", "Terms of employment", "", sections


DOCS = [company, results, products, leave, security, service, facilities, project,
        purchasing, learning, fleet, employment]
WHAT = ["water pumps for farms", "accounting software for small shops", "frozen meals",
        "outdoor clothing", "hearing aids", "bicycle parts", "board games", "insurance for boats",
        "solar panels", "office furniture", "craft beer", "pet food", "language courses",
        "payment terminals", "wind turbine blades", "ceramic tiles", "medical scanners"]


def make_org(r, name):
    slug = name.lower().replace(" ", "-")
    o = {
        "name": name, "slug": slug, "hq": r.choice(CITIES), "cur": r.choice(CURRENCIES),
        "family": r.choice(FAMILIES), "kind": r.choice(KINDS), "people": set(),
        "what": r.choice(WHAT),
        "prefix": r.choice([f"examples/{slug}-kb/docs", "docs", f"kb/{slug}", "handbook",
                            f"shared/{slug}/docs", "wiki"]),
    }
    docs = []
    for gen in r.sample(DOCS, r.randrange(5, 9)):
        slug_, title, intro, sections = gen(r, o)
        html = r.random() < 0.2
        source = f"{o['prefix']}/{slug_}.{'html' if html else 'md'}"
        width = r.randrange(72, 81)
        docs.append({"source": source, "title": title, "intro": intro, "sections": sections,
                     "html": html, "width": width})
    o["docs"] = docs
    return o


def render(doc, s, first=False):
    """A section's chunk text, as the indexer cuts it from Markdown or HTML."""
    w = doc["width"]
    body = []
    for p in s["paras"]:
        body.append(p if p.startswith("- ") else textwrap.fill(p, w, break_on_hyphens=False))
    if doc["html"]:
        text = s["heading"] + "\n" + "\n".join(b.replace("**", "") for b in body)
        return (doc["title"] + "\n\n" + text) if first else text
    text = "#" * s["level"] + " " + s["heading"] + "\n\n" + (
        "\n".join(body) if body[0].startswith("- ") else "\n\n".join(body))
    return (f"# {doc['title']}\n\n{text}") if first else text


def render_intro(doc):
    if doc["html"]:
        return doc["title"] + ("\n\n" + textwrap.fill(doc["intro"], doc["width"]) if doc["intro"] else "")
    return f"# {doc['title']}" + ("\n\n" + textwrap.fill(doc["intro"], doc["width"]) if doc["intro"] else "")


def chunk(doc, i):
    """Section i of doc as a passage (the first one sometimes carries the title)."""
    s = doc["sections"][i]
    first = i == 0 and not doc["intro"]
    return {"source": doc["source"], "text": render(doc, s, first)}


def question(r, o, qs):
    q = r.choice(qs).replace("{org}", o["name"])
    # People often leave the organisation out of a question about its own documents.
    if r.random() < 0.3 and o["name"] in q:
        q = q.replace(f"{o['name']}'s ", "the ").replace(f"of {o['name']}", "of the company")
        q = q.replace(f" {o['name']} ", " the company ").replace(f"the {o['name']}", "the company")
    return q


def example(r, o, mode, k):
    """mode: 'answer' or 'unknown'. Returns (messages, answer position or 0)."""
    doc = r.choice([d for d in o["docs"] if d["sections"]])
    ti = r.randrange(len(doc["sections"]))
    target = doc["sections"][ti]
    qs, ans = r.choice(target["facts"])
    # Distractors: other sections of the same document, then of the others,
    # and now and then the document's title/intro chunk (retrieval returns those).
    pool = [chunk(doc, j) for j in range(len(doc["sections"])) if j != ti]
    r.shuffle(pool)
    others = [d for d in o["docs"] if d is not doc]
    r.shuffle(others)
    extra = []
    for d in others[:3]:
        extra.append(chunk(d, r.randrange(len(d["sections"]))))
    if doc["intro"] and r.random() < 0.35:
        pool.insert(0, {"source": doc["source"], "text": render_intro(doc)})
    distract = (pool[:1] + extra[:1] + pool[1:] + extra[1:]) if r.random() < 0.35 else (pool + extra)
    if mode == "unknown":
        passages = distract[:k]
        pos = 0
    else:
        passages = distract[: k - 1]
        pos = r.choices(range(1, k + 1), weights=[55, 35] if k == 2 else [40, 30, 30])[0]
        passages.insert(pos - 1, chunk(doc, ti))
    user = "".join(f"[{n}] ({p['source']})\n{p['text'].strip()}\n\n" for n, p in enumerate(passages, 1))
    q = question(r, o, qs)
    user += f"Question: {q.strip()}"
    answer = UNKNOWN if mode == "unknown" else f"{ans} [{pos}]."
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}], pos


def build(r, orgs, n):
    out, seen, positions = [], set(), {}
    while len(out) < n:
        o = r.choice(orgs)
        mode = "unknown" if r.random() < 0.10 else "answer"
        k = 3 if r.random() < 0.15 else 2
        msgs, pos = example(r, o, mode, k)
        key = (msgs[1]["content"].split("Question: ")[1], msgs[2]["content"])
        text = (msgs[1]["content"] + " " + msgs[2]["content"]).lower()
        # Short enough for --seq-len 288 (system prompt and chat template included).
        if len(text) > MAX_CHARS or key in seen or FORBIDDEN_RE.search(text):
            continue
        seen.add(key)
        positions[pos] = positions.get(pos, 0) + 1
        out.append({"messages": msgs})
    return out, positions


def main():
    r = random.Random(SEED)
    names = ORGS[:]
    r.shuffle(names)
    train_orgs = [make_org(r, nm) for nm in names[:40]]
    eval_orgs = [make_org(r, nm) for nm in names[40:]]
    train, pt = build(r, train_orgs, N_TRAIN)
    evl, pe = build(r, eval_orgs, N_EVAL)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evl)):
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    fmt = lambda p: ", ".join(f"{'none' if k == 0 else f'[{k}]'}: {v}" for k, v in sorted(p.items()))
    print(f"train.jsonl: {len(train)} examples ({fmt(pt)}) from {len(train_orgs)} organisations")
    print(f"eval.jsonl: {len(evl)} examples ({fmt(pe)}) from {len(eval_orgs)} others")


if __name__ == "__main__":
    main()
