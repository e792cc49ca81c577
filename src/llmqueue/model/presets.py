"""Fitted batch-time presets for real engines, each with its provenance (``preset:NAME`` specs).

``NAME`` is the composition fit of a data set (``h200-llama3-8b``, ``a100-llama2-70b-tp4``) and
``NAME-tokens`` its best token-only fit. The table is the output of :func:`llmqueue.studies.fit.presets_from`
on the shipped data (``llmqueue fit --json``); tests/test_fit.py refits the data and checks every
entry, so the numbers cannot drift from their source silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmqueue.errors import ConfigError

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True, slots=True)
class Preset:
    """One fitted model and where it comes from: data file and rows, fit method, goodness of fit.

    ``better`` says whether this fit beat the other kind (composition vs token-only) on its data
    by adjusted R^2. Paths are relative to the project's ``../shared`` directory.
    """

    name: str
    kind: str
    spec: str
    data: str
    rows: str
    method: str
    samples: int
    r_squared: float
    rmse_ms: float
    max_rel_error: float
    better: bool
    fitted: str

    def to_dict(self) -> dict[str, Any]:
        """The entry as plain JSON-ready values."""
        return asdict(self)


FIT_DATE = "2026-11-28"
"""Date of the shipped fits (the day the H200 data was measured)."""

_METHODS = {
    "composition": "nnls on c, prefill, decode, kv, chunk (logit collinear: 0); floor scanned",
    "piecewise": "least squares c, a >= 0; b0 scanned",
}
_TP2_EXCLUDED = (
    "; 5 rows excluded: batch_size=64 at TP2, where prompt_time drops 8x from batch 32 while e2e_time "
    "rises 8-9x (the 64 prompts did not run as one batch)"
)
_Fit = tuple[str, float, float, float]
"""One fit of the table: spec, R^2, RMSE (ms), largest relative error."""


def _splitwise(model: str, hardware: str, tp: int) -> tuple[str, str, int]:
    """Data file, rows and samples of one (model, hardware, tensor_parallel) of the Splitwise profile."""
    counts = ("100 rows -> 12 prefill + 18 decode medians" + _TP2_EXCLUDED if tp == 2
              else "105 rows -> 13 prefill + 19 decode medians")
    return ("data/profiles/splitwise_perf_model.csv",
            f"model={model}, hardware={hardware}, tensor_parallel={tp}: {counts}", 30 if tp == 2 else 32)


def _h200(model: str) -> tuple[str, str, int]:
    """Data file, rows and samples of one model of the H200 measurement."""
    return "data/gpu/batch_times_h200.csv", f"model={model}, mode=graph: 67 rows (median_ms)", 67


def _pair(name: str, source: tuple[str, str, int], better: str, composition: _Fit,
          tokens: _Fit) -> tuple[Preset, Preset]:
    """The presets ``name`` (composition) and ``name-tokens`` of one data set; ``better`` names the
    one of higher adjusted R^2 (``composition`` or ``tokens``). The kind is the spec's prefix."""
    data, rows, samples = source

    def preset(suffix: str, fit: _Fit, is_better: bool) -> Preset:
        spec, r_squared, rmse_ms, max_rel_error = fit
        kind = spec.partition(":")[0]
        return Preset(name + suffix, kind, spec, data, rows, _METHODS[kind], samples, r_squared, rmse_ms,
                      max_rel_error, is_better, FIT_DATE)

    return preset("", composition, better == "composition"), preset("-tokens", tokens, better == "tokens")


# llmqueue.studies.fit.presets_from(...) on the data as of 2026-11-28, one _pair per data set (its composition
# preset, then NAME-tokens, sharing data, rows and date); do not edit by hand.
_TABLE: tuple[Preset, ...] = (
    *_pair("a100-llama2-70b-tp2", _splitwise("llama2-70b", "a100-80gb", 2), better="composition",
           composition=("composition:c=0,prefill=0.3598558291537365,decode=2.623025844169302,kv=0,"
                        "chunk=21.753029421455377,logit=0,floor=61.69249445537296",
                        0.9997451100247285, 21.974419516050244, 0.16356604454734827),
           tokens=("piecewise:c=62.95535705231801,a=0.4015986084191073,b0=320",
                   0.9981829197300874, 58.671621406805315, 0.44253850898255803)),
    *_pair("h100-llama2-70b-tp2", _splitwise("llama2-70b", "h100-80gb", 2), better="tokens",
           composition=("composition:c=17.431097385490673,prefill=0.14749765797535638,"
                        "decode=1.178389857099132,kv=0,chunk=0,logit=0,floor=40.40494674631563",
                        0.9978211549045368, 23.946755938173276, 0.1640014524694747),
           tokens=("piecewise:c=39.26750245663785,a=0.14776667986630954,b0=165",
                   0.9978121155335768, 23.996378457143994, 0.24913074295365048)),
    *_pair("a100-llama2-70b-tp4", _splitwise("llama2-70b", "a100-80gb", 4), better="composition",
           composition=("composition:c=0,prefill=0.26125226441946586,decode=1.324393444858261,kv=0,"
                        "chunk=35.37133596179135,logit=0,floor=46.37457280186936",
                        0.9983918602291693, 84.37098754403405, 0.4142537588960863),
           tokens=("piecewise:c=52.596401575990654,a=0.33740615567681564,b0=762",
                   0.997696735728095, 100.97250289023918, 0.5857616868573188)),
    *_pair("h100-llama2-70b-tp4", _splitwise("llama2-70b", "h100-80gb", 4), better="tokens",
           composition=("composition:c=8.011175738227518,prefill=0.10701784405595846,"
                        "decode=0.7347689709226187,kv=0,chunk=0,logit=0,floor=32.842764820203215",
                        0.9993796781827609, 16.971631019909378, 0.33091502133306006),
           tokens=("piecewise:c=33.11886279916174,a=0.10736566595994798,b0=296",
                   0.9993692294352952, 17.113969847766295, 0.3674284851161109)),
    *_pair("a100-llama2-70b-tp8", _splitwise("llama2-70b", "a100-80gb", 8), better="tokens",
           composition=("composition:c=0,prefill=0.17749439269303738,decode=1.318124826773114,kv=0,"
                        "chunk=25.79544048174081,logit=0,floor=46.51014871095989",
                        0.9971515204645324, 77.36165944459029, 0.5966992742815336),
           tokens=("piecewise:c=51.0729638423179,a=0.23385921594225634,b0=924",
                   0.9968324761539682, 81.57914920105611, 0.5512935283526942)),
    *_pair("h100-llama2-70b-tp8", _splitwise("llama2-70b", "h100-80gb", 8), better="tokens",
           composition=("composition:c=12.67758144876318,prefill=0.0907884602561421,"
                        "decode=0.6306768591876404,kv=0,chunk=0,logit=0,floor=34.166309252879984",
                        0.9974564465556159, 29.18515339891429, 0.4973711921448651),
           tokens=("piecewise:c=34.4907756228051,a=0.09119168940067211,b0=324",
                   0.9974655819116842, 29.132695961267284, 0.4452974287633125)),
    *_pair("a100-bloom-176b-tp8", _splitwise("bloom-176b", "a100-80gb", 8), better="tokens",
           composition=("composition:c=42.92696831724449,prefill=0.34981881084428007,"
                        "decode=0.2580370374478388,kv=0.0009825375435508813,chunk=0,logit=0,"
                        "floor=50.51579097020035",
                        0.9934207181849682, 182.43647896134064, 0.4364578720777802),
           tokens=("piecewise:c=49.85741066412746,a=0.3496192156525121,b0=9",
                   0.993414625506545, 182.52093115686236, 0.4428424761710639)),
    *_pair("h100-bloom-176b-tp8", _splitwise("bloom-176b", "h100-80gb", 8), better="tokens",
           composition=("composition:c=15.719078228623859,prefill=0.15375417138129577,"
                        "decode=0.8261171465821707,kv=0,chunk=0,logit=0,floor=38.141739441496206",
                        0.9969826232630858, 53.97852216747206, 0.38425753945877866),
           tokens=("piecewise:c=39.167725213241724,a=0.153913469021885,b0=172",
                   0.9969635225773704, 54.1491008459375, 0.38629110751714024)),
    *_pair("h100-pcap-llama2-70b-tp2", _splitwise("llama2-70b", "h100-80gb-pcap", 2), better="tokens",
           composition=("composition:c=24.537250485529857,prefill=0.19154543411182245,decode=0,"
                        "kv=0.00174975666247673,chunk=0,logit=0,floor=37.8394212058606",
                        0.9978434638916561, 31.115170561417514, 0.21925089203637455),
           tokens=("piecewise:c=38.765971084861825,a=0.19180937658320085,b0=87",
                   0.9978322708611171, 31.19581431069433, 0.25872097571486957)),
    *_pair("h100-pcap-llama2-70b-tp4", _splitwise("llama2-70b", "h100-80gb-pcap", 4), better="tokens",
           composition=("composition:c=10.263511573986959,prefill=0.13913121772128426,decode=0,"
                        "kv=0.0012225241054468578,chunk=0,logit=0,floor=32.842764820203215",
                        0.9993683271791503, 22.317803784867806, 0.485319247179277),
           tokens=("piecewise:c=32.97557073464743,a=0.13938731783271827,b0=198",
                   0.9993607206559502, 22.4517757407931, 0.4832380384747301)),
    *_pair("h100-pcap-llama2-70b-tp8", _splitwise("llama2-70b", "h100-80gb-pcap", 8), better="tokens",
           composition=("composition:c=16.293703189359654,prefill=0.11803493794036198,decode=0,"
                        "kv=0.0009911822097907054,chunk=0,logit=0,floor=34.166309252879984",
                        0.997440555266949, 38.17064213414317, 0.5483099002649063),
           tokens=("piecewise:c=34.49131293643294,a=0.11834647590950133,b0=204",
                   0.9974418574983757, 38.16093039210146, 0.5440132422574006)),
    *_pair("h100-pcap-bloom-176b-tp8", _splitwise("bloom-176b", "h100-80gb-pcap", 8), better="tokens",
           composition=("composition:c=19.73915289201364,prefill=0.19991736843534977,decode=0,"
                        "kv=0.001313485333366761,chunk=0,logit=0,floor=38.141739441496206",
                        0.9969949962874661, 70.17373095437769, 0.38226070868564366),
           tokens=("piecewise:c=38.67676696595065,a=0.1999629923763827,b0=99",
                   0.9969818422092638, 70.3271521939654, 0.39398380451600673)),
    *_pair("h200-llama3-8b", _h200("llama3-8b"), better="composition",
           composition=("composition:c=2.3255038327536344,prefill=0.026383169532498803,"
                        "decode=0.029377346472038216,kv=3.3565675377739175e-05,chunk=0.3371778294998273,"
                        "logit=0,floor=8.2459",
                        0.9981027640891554, 1.464513617756173, 0.31610112682350705),
           tokens=("piecewise:c=7.514545660029524,a=0.028968786152239846,b0=13",
                   0.9803242524698371, 4.716266816626936, 0.6154553894933854)),
    *_pair("h200-codellama-34b", _h200("codellama-34b"), better="composition",
           composition=("composition:c=5.943882110693371,prefill=0.11526202544014906,"
                        "decode=0.11588358229534412,kv=5.265286355114852e-05,chunk=0.39558952444001655,"
                        "logit=0,floor=24.4263",
                        0.99946802317052, 3.080337859744123, 0.18064094522292526),
           tokens=("piecewise:c=23.6841036892462,a=0.1169683230161336,b0=90",
                   0.9978888706096721, 6.1363400905370185, 0.2855818817418707)),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _TABLE}
"""Every shipped preset by name."""


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ConfigError listing the known names otherwise."""
    preset = PRESETS.get(name.strip())
    if preset is None:
        raise ConfigError("batch-time", f"preset:{name}",
                          f"unknown preset {name.strip()!r} (`llmqueue fit --list-presets` lists them)")
    return preset
