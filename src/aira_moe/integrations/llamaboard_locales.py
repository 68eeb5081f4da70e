"""LlamaBoard texts of the AIRA-MoE panel, in LlamaBoard's ``locales.py`` shape ({element: {language: {prop: text}}}).

The English help of every key is not here: it is read from AiraMoeConfig (the one copy). This module holds only
translations: Chinese help per key (a key without one shows the English help), and the few fixed texts of the panel,
the allocation view and the export-lora button. Every label carries the YAML key, so the UI, the saved arguments and
the YAML recipes name a setting the same way.
"""

from __future__ import annotations

# Chinese help of each aira_moe key (keys of arguments.METHOD_KEYS); translated from AiraMoeConfig's help
ZH_HELP = {
    "num_A": "每层下投影专家 A_i（r × in）的数量。",
    "num_B": "每层上投影专家 B_j（out × r）的数量。",
    "cola_strategy": "A 与 B 专家的协作方式：'full' 对所有组合求和（一对 LoRA 大小的 GEMM），'heuristic' 将每个 B 绑定到"
                     "一个 A，'random' 在每个训练步把每个 A 与一个随机的 B 配对，评估与合并时使用其期望，'routed' 用训练的"
                     " softmax 路由器按 token 混合 num_A * num_B 个组合（不可合并、不可导出为 LoRA：以未合并方式部署）。",
    "router_top_k": "仅 'routed'：每个 token 只保留 router_top_k 个最大的门控值（不重新归一化）；0 保留全部 "
                    "num_A * num_B 个门控（稠密）。",
    "router_input": "仅 'routed'：路由器的输入。'layer'：层输入，每个模块 num_A * num_B * (in + 1) 个参数；"
                    "'projections'：专家自己的下投影 A_i x（RMS 归一化），num_A * num_B * (num_A * r + 1) 个参数，"
                    "把参数留给专家的秩。",
    "router_aux_loss_coef": "仅 'routed'：加到训练损失上的负载均衡损失（Switch Transformer 的 E * sum f_e P_e，"
                            "各层取平均）的权重；0 表示关闭。",
    "cola_seed": "'random' 策略逐步配对的随机种子（所有进程相同）。",
    "use_layer_wise_rank": "根据校准得到的层重要性，为每个解码层分配秩。",
    "theta_type": "层重要性：'lod'（|W_ij| · ||X_j|| 中离群项的比例）或 'act'（平均 |x|）。",
    "lod_threshold_M": "某项超过参考水平（见 lod_reference）的 lod_threshold_M 倍时视为离群。",
    "lod_reference": "LOD 离群阈值的参考水平：全部 |W_ij| · ||X_j|| 的 'mean'（原始公式）或 'median'（不会被少数"
                     "极大的通道抬高）。",
    "rank_budget": "所有分配单元（解码层）的秩之和；'auto' 表示 num_layers × r（与统一秩 r 的参数量相同）。",
    "min_rank": "一层可分配到的最小秩。",
    "max_rank": "一层可分配到的最大秩。",
    "layer_scaling": "分配后各层的缩放：'rank' 使用该层分配秩的 lora_alpha / r_l（逐层的 LoRA 规则），'base' 在每层都"
                     "使用配置的 r 的 lora_alpha / r（启用 rsLoRA 时两者均为 sqrt(r)）。",
    "objective_function": "分配目标 max sum_l theta_l · f(r_l) 中的 f：log、linear、exp2（r^2）、cubic（r^3）。",
    "use_awsvd_init": "用 W · diag(激活 RMS) 的 SVD 初始化 A 和 B；初始更新从基础权重中减去，使第 0 步的模型输出不变。",
    "awsvd_mode": "'directions'（默认）：A 专家从 W 按激活加权的主要输入方向出发、采用 LoRA 的初始化尺度，B 为零，"
                  "因此更新从零开始、基础权重不变。'residual'（原始方法）：适配器初始化为 W 按激活加权的最佳秩 r "
                  "近似，并从基础权重中减去（类似 PiSSA）。",
    "awsvd_collect_steps": "校准批次数（一次校准为所有技术提供统计量）。",
    "awsvd_solver": "AwSVD 使用的 SVD：'randomized'（快速，默认）或 'full'。",
    "awsvd_niter": "随机 SVD 的幂迭代次数。",
    "awsvd_oversample": "随机 SVD 额外采样的列数。",
    "awsvd_split": "奇异值放在哪里：'reference' 放入 B，'symmetric' 把 sqrt(S) 分给 A 和 B。",
    "use_activation_aware": "用固定的逐通道激活分数对更新加权。",
    "activation_aware_mode": "'inps' 对输入通道打分（平均 |x|），'outps' 对输出通道打分（平均 |Wx|）。",
    "activation_normalize": "由分数 s 得到通道权重：'inverse' 为 (1/s) / mean(1/s)（默认：在激活白化的坐标中训练更新），"
                            "'minmax' 为 (s - min) / (max - min)（原始公式），'mean' 为 s / mean(s)，'sqrt' 为 "
                            "sqrt(s) / mean(sqrt(s))，'none' 即 s。True 与 False 分别表示 'minmax' 与 'none'。",
}

# group titles, keyed by the switch that opens the group (None: the keys before the first switch)
GROUP_TITLES = {
    None: {"en": "Collaboration", "ru": "Коллаборация", "zh": "协作", "ko": "협업", "ja": "協調"},
    "use_layer_wise_rank": {"en": "Layer-wise ranks", "ru": "Ранги по слоям", "zh": "逐层秩分配", "ko": "레이어별 랭크",
                            "ja": "層ごとのランク"},
    "use_awsvd_init": {"en": "AwSVD initialisation", "ru": "Инициализация AwSVD", "zh": "AwSVD 初始化",
                       "ko": "AwSVD 초기화", "ja": "AwSVD 初期化"},
    "use_activation_aware": {"en": "Activation-aware weighting", "ru": "Взвешивание по активациям", "zh": "激活感知加权",
                             "ko": "활성화 인식 가중치", "ja": "活性化に基づく重み付け"},
}

# the fixed elements: {element name: {language: {gradio prop: text}}}
FIXED = {
    "aira_moe_tab": {
        "en": {"label": "AIRA-MoE configurations (finetuning_type: aira_moe)"},
        "ru": {"label": "Конфигурации AIRA-MoE (finetuning_type: aira_moe)"},
        "zh": {"label": "AIRA-MoE 参数设置（finetuning_type: aira_moe）"},
        "ko": {"label": "AIRA-MoE 구성 (finetuning_type: aira_moe)"},
        "ja": {"label": "AIRA-MoE 設定 (finetuning_type: aira_moe)"},
    },
    "aira_moe_allocation_image": {
        "en": {"label": "Rank allocation (aira_moe_allocation.png)"},
        "ru": {"label": "Распределение рангов (aira_moe_allocation.png)"},
        "zh": {"label": "秩分配（aira_moe_allocation.png）"},
        "ko": {"label": "랭크 할당 (aira_moe_allocation.png)"},
        "ja": {"label": "ランク割り当て (aira_moe_allocation.png)"},
    },
    "aira_moe_note": {
        "en": {"value": "LoRA rank, alpha, dropout, target modules, rsLoRA and additional targets come from the LoRA "
                        "panel above."},
        "ru": {"value": "Ранг, alpha, dropout, целевые модули, rsLoRA и дополнительные цели LoRA берутся из панели "
                        "LoRA выше."},
        "zh": {"value": "LoRA 秩、alpha、dropout、目标模块、rsLoRA 与额外目标取自上方的 LoRA 参数设置。"},
        "ko": {"value": "LoRA 랭크, alpha, dropout, 대상 모듈, rsLoRA, 추가 대상은 위의 LoRA 패널에서 가져옵니다."},
        "ja": {"value": "LoRA のランク、alpha、dropout、対象モジュール、rsLoRA、追加対象は上の LoRA 設定から取られます。"},
    },
    "export_lora_btn": {
        "en": {"value": "Export as standard LoRA (aira-moe export-lora, for vLLM / SGLang)"},
        "ru": {"value": "Экспорт как стандартный LoRA (aira-moe export-lora, для vLLM / SGLang)"},
        "zh": {"value": "导出为标准 LoRA（aira-moe export-lora，用于 vLLM / SGLang）"},
        "ko": {"value": "표준 LoRA로 내보내기 (aira-moe export-lora, vLLM / SGLang용)"},
        "ja": {"value": "標準 LoRA としてエクスポート (aira-moe export-lora、vLLM / SGLang 用)"},
    },
}

# the end of each key's info line
DEFAULT_TEXT = {"en": "Default: {default}.", "zh": "默认值：{default}。"}

# one-line messages, formatted with str.format
MESSAGES = {
    "complete_run": {
        "en": "The run in {output_dir} is complete; nothing would be trained. Choose another output dir (or set "
              "overwrite_output_dir in the extra arguments).",
        "zh": "{output_dir} 中的训练已完成，不会再训练。请选择其他输出目录（或在额外参数中设置 overwrite_output_dir）。",
    },
    "one_adapter": {
        "en": "export-lora writes one adapter; select exactly one checkpoint (selected: {count}).",
        "zh": "export-lora 只导出一个适配器，请只选择一个检查点（已选择 {count} 个）。",
    },
    "exported": {
        "en": "Wrote a standard LoRA adapter (r={r}, {modules} modules, {dtype}) to {out_dir}.",
        "zh": "已将标准 LoRA 适配器（r={r}，{modules} 个模块，{dtype}）写入 {out_dir}。",
    },
}


def translated(texts: dict, lang: str, **values) -> str:
    """``texts[lang]`` (English where there is no translation), formatted with ``values``."""
    return texts.get(lang, texts["en"]).format(**values)


def message(name: str, lang: str, **values) -> str:
    return translated(MESSAGES[name], lang, **values)
