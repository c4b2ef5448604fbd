"""The files of an ``attnlab compare`` folder — named once, here, for the run and the report:

    <out>/compare.json            run settings, machine, precision, plans (RUN_INFO)
    <out>/data/                   the encoded corpus every model trains on (DATA)
    <out>/<model>/                each model's run folder (the trainer's files) + result.json (RESULT)
    <out>/report.md, report.html  and the PNG plots below (REPORT_FILES)
"""

RUN_INFO = "compare.json"
DATA = "data"
RESULT = "result.json"
ATTENTION_PNG = "attention.png"
LOSS_TIME_PNG = "loss_vs_time.png"
LOSS_TOKENS_PNG = "loss_vs_tokens.png"
LOSS_POSITION_PNG = "loss_by_position.png"
KV_PNG = "kv_tradeoff.png"
MOE_PNG = "moe_load.png"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_FILES = (REPORT_MD, REPORT_HTML, LOSS_TIME_PNG, LOSS_TOKENS_PNG, LOSS_POSITION_PNG, KV_PNG, MOE_PNG, ATTENTION_PNG)
