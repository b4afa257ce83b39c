# baton: two commands do everything on a fresh machine.
#   make demo   set-up + the whole pipeline on the embedded emoji data -> runs/demo/report.md
#   make test   set-up + the test suite
# Both are idempotent: a second run skips what is done (file targets and stamps).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch and torchvision are pinned to the builds that lie on this project's machines; override
# TORCH_SPEC for another platform (e.g. TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# faiss (retrieval metrics) as one of its two extras, never both: FAISS=faiss-gpu on a CUDA machine.
FAISS  ?= faiss-cpu
STAMP  := $(VENV)/.baton-installed
# SEED changes every random choice of the demo (class split, initialisation, order, augmentation);
# `make demo SEED=1` writes to runs/demo-seed1 and data/emoji-seed1.
SEED   ?= 0
ifeq ($(SEED),0)
DEMO   := runs/demo
DATA   := data/emoji
GDATA  := data/grounding-emoji-100
else
DEMO   := runs/demo-seed$(SEED)
DATA   := data/emoji-seed$(SEED)
GDATA  := data/grounding-emoji-100-seed$(SEED)
endif
# The demo's training precision: bf16 autocast where the CPU multiplies bf16 in hardware (AVX512-BF16,
# AMX; about 2x a step of the demo's convnet, BENCHMARKS.md), fp32 elsewhere. `make demo PRECISION=fp32`
# forces fp32 (the figures move by rounding; each run's config.yaml records the precision it used).
PRECISION ?= $(shell grep -qsE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo bf16 || echo fp32)
RUNARGS := seed=$(SEED) data.root=$(DATA) train.precision=$(PRECISION)
export OMP_NUM_THREADS ?= 2
# `make demo` (and demo-lg) runs its independent steps DEMO_JOBS at a time (make -j): on 2 cores two
# finetunings side by side with one torch thread each (FINETUNE_THREADS) take 0.7x the time of one
# after the other with two, whose small ops barely use the second core (BENCHMARKS.md, "make demo in
# 15 minutes"). Runs are seeded either way; the thread count changes the order of floating-point sums,
# so DEMO_JOBS=1 (two threads a finetuning) moves a figure within the seed-to-seed spread.
DEMO_JOBS ?= 2
FINETUNE_THREADS ?= $(if $(filter 1,$(DEMO_JOBS)),$(OMP_NUM_THREADS),1)
FTARGS := $(RUNARGS) train.threads=$(FINETUNE_THREADS)
export HF_HUB_OFFLINE = 1
export PYTHONUNBUFFERED = 1

.PHONY: all setup demo demo-lg demo-dino demo-glip results test test-fast system-deps clean clean-demo

all: demo

# --- set-up ---------------------------------------------------------------------------------
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,$(FAISS)]'
	touch $@

# Optional emoji designs from Debian packages (Noto Color Emoji, EmojiOne). Installed where
# apt-get works; the demo goes on with the PyPI designs (Twemoji, OpenMoji) where it does not.
.stamp-system-deps:
	@if [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] && dpkg -s ruby-gemojione >/dev/null 2>&1; then \
	  echo "system emoji designs present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    fonts-noto-color-emoji ruby-gemojione >/dev/null) || echo "apt-get failed: going on without Noto/EmojiOne"; \
	else echo "no apt-get as root: going on without Noto/EmojiOne designs"; fi
	touch $@

system-deps: .stamp-system-deps

setup: $(STAMP) .stamp-system-deps

# --- tests ----------------------------------------------------------------------------------
test: setup
	$(BIN)/python -m pytest -q -ra --durations=40 tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# --- the demo pipeline ----------------------------------------------------------------------
$(DATA)/stats.json: | setup
	$(BIN)/baton shards emoji --seed $(SEED) --out $(DATA)

$(DEMO)/eval_pixels/metrics.json: $(DATA)/stats.json
	$(BIN)/baton evaluate pixels --data-source shards --data-root $(DATA) --out $(DEMO)/eval_pixels

$(DEMO)/pretrain/export/backbone.json: $(DATA)/stats.json configs/demo_clip.yaml
	$(BIN)/baton pretrain configs/demo_clip.yaml resume=latest seed=$(SEED) train.precision=$(PRECISION) \
	  data.train_shards=$(DATA)/train run_dir=$(DEMO)/pretrain
	$(BIN)/baton export $(DEMO)/pretrain $(DEMO)/pretrain/export

$(DEMO)/eval_random/metrics.json: $(DEMO)/pretrain/export/backbone.json
	$(BIN)/baton evaluate random --seed $(SEED) --like $(DEMO)/pretrain/export --data-source shards --data-root $(DATA) --out $(DEMO)/eval_random

$(DEMO)/eval_pretrained/metrics.json: $(DEMO)/pretrain/export/backbone.json
	$(BIN)/baton evaluate $(DEMO)/pretrain/export --data-source shards --data-root $(DATA) --out $(DEMO)/eval_pretrained

# Finetunings of the same length from the same backbone, each evaluated on the held-out classes:
# SoftTriple alone (make demo), + expert language guidance (ELG: the classes' own names) and +
# pseudo-label guidance (PLG: baton's CLIP zero-shot over ImageNet names) (make demo-lg).
# $(call demo_finetune,CONFIG,RUN_DIR,BACKBONE): one of the demo's finetunings (-Oline holds a
# command's output until it ends, so the first line says where its log grows meanwhile).
define demo_finetune
	@echo "finetuning $(2) (its log as it goes: $(2)/log.txt)"
	$(BIN)/baton finetune $(1) resume=latest $(FTARGS) run_dir=$(2) backbone=$(3)
	touch $@
endef

$(DEMO)/finetune/model/.done: $(DEMO)/pretrain/export/backbone.json configs/demo_softtriple.yaml
	$(call demo_finetune,configs/demo_softtriple.yaml,$(DEMO)/finetune,$(DEMO)/pretrain/export)

$(DEMO)/finetune_%/model/.done: $(DEMO)/pretrain/export/backbone.json configs/demo_softtriple_%.yaml configs/demo_softtriple.yaml
	$(call demo_finetune,configs/demo_softtriple_$*.yaml,$(DEMO)/finetune_$*,$(DEMO)/pretrain/export)

.PRECIOUS: $(DEMO)/finetune_%/model/.done

# The honest comparison: the same recipe and steps from a random init of the same architecture.
$(DEMO)/finetune_scratch/model/.done: $(DEMO)/pretrain/export/backbone.json configs/demo_softtriple.yaml
	$(call demo_finetune,configs/demo_softtriple.yaml,$(DEMO)/finetune_scratch,random:$(DEMO)/pretrain/export)

$(DEMO)/eval_finetuned/metrics.json: $(DEMO)/finetune/model/.done
	$(BIN)/baton evaluate $(DEMO)/finetune --data-source shards --data-root $(DATA) --out $(DEMO)/eval_finetuned

$(DEMO)/eval_%/metrics.json: $(DEMO)/finetune_%/model/.done
	$(BIN)/baton evaluate $(DEMO)/finetune_$* --data-source shards --data-root $(DATA) --out $(DEMO)/eval_$*

# `make demo-dino`: DINO (self-distillation, images only) on the same training shards, its teacher's
# backbone and the same backbone untrained, SoftTriple on the DINO backbone, on the same held-out
# classes -> $(DEMO)/dino/report.md (~8 min on 2 idle cores). Outside `make demo` (its 15-minute
# budget). At this scale DINO no longer collapses (Sinkhorn-Knopp targets + KoLeo: its loss ends well
# below ln(out_dim), its k-NN monitor rises) but its backbone does not retrieve better than the same
# net untrained (BENCHMARKS.md, "DINO"), so the order of its rows is reported, not checked.
$(DEMO)/dino/export/backbone.json: $(DATA)/stats.json configs/dino_demo.yaml
	$(BIN)/baton pretrain configs/dino_demo.yaml resume=latest seed=$(SEED) train.precision=$(PRECISION) \
	  data.train_shards=$(DATA)/train dino.knn_shards=$(DATA)/test run_dir=$(DEMO)/dino
	$(BIN)/baton export $(DEMO)/dino $(DEMO)/dino/export

$(DEMO)/dino/eval_random/metrics.json: $(DEMO)/dino/export/backbone.json
	$(BIN)/baton evaluate random --seed $(SEED) --like $(DEMO)/dino/export --data-source shards --data-root $(DATA) --out $(DEMO)/dino/eval_random

$(DEMO)/dino/eval_pretrained/metrics.json: $(DEMO)/dino/export/backbone.json
	$(BIN)/baton evaluate $(DEMO)/dino/export --data-source shards --data-root $(DATA) --out $(DEMO)/dino/eval_pretrained

$(DEMO)/dino/finetune/model/.done: $(DEMO)/dino/export/backbone.json configs/demo_softtriple_dino.yaml configs/demo_softtriple.yaml
	$(BIN)/baton finetune configs/demo_softtriple_dino.yaml resume=latest $(RUNARGS) \
	  run_dir=$(DEMO)/dino/finetune backbone=$(DEMO)/dino/export
	touch $@

$(DEMO)/dino/eval_finetuned/metrics.json: $(DEMO)/dino/finetune/model/.done
	$(BIN)/baton evaluate $(DEMO)/dino/finetune --data-source shards --data-root $(DATA) --out $(DEMO)/dino/eval_finetuned

$(DEMO)/dino/report.md: $(DEMO)/eval_pixels/metrics.json $(DEMO)/dino/eval_random/metrics.json \
                        $(DEMO)/dino/eval_pretrained/metrics.json $(DEMO)/dino/eval_finetuned/metrics.json
	$(BIN)/baton report --out $@ --title "baton demo, DINO: retrieval on held-out classes" \
	  --row "raw pixels 16x16=$(DEMO)/eval_pixels" \
	  --row "random init=$(DEMO)/dino/eval_random" \
	  --row "DINO pretrained=$(DEMO)/dino/eval_pretrained" \
	  --row "DINO + SoftTriple finetuned=$(DEMO)/dino/eval_finetuned" \
	  --loss-curve "DINO pretrain=$(DEMO)/dino/metrics.jsonl"

demo-dino: setup $(DEMO)/dino/report.md
	@cat $(DEMO)/dino/report.md

# `make demo-glip`: GLIP (grounded pretraining) on synthetic scenes of the same emoji classes (training
# classes only: the emoji source's seeded split), scored on held-out scenes of the training classes
# (val) and zero-shot on scenes of the unseen ones (test), against the same model with a small text
# transformer instead of the locked pretrained MiniLM, left at its random init ("text side untrained") or
# trained from scratch; then its image backbone as a handoff, alone
# and finetuned with SoftTriple, on the emoji held-out classes -> $(DEMO)/glip/report.md. Outside
# `make demo` (its 15-minute budget). The scenes show 100 classes (50 seen in training, 50 unseen), the
# first 100 of the emoji source's seeded order, so the 50 training classes are emoji training classes:
# 2,000 scenes show each about 100 times (over all ~960 classes, five times: too few to learn a name).
# Every GLIP run's image backbone starts from the demo CLIP's image tower (glip.init_from), so it needs
# `make demo`'s CLIP pretraining first (built here when missing).
GLIP_RUN := seed=$(SEED) train.precision=$(PRECISION) train.eval_every=0 data.train_shards=$(GDATA)/train glip.eval.shards=$(GDATA)/test \
  glip.init_from=$(DEMO)/pretrain/export

$(GDATA)/val/stats.json: | setup
	$(BIN)/baton shards grounding-emoji --seed $(SEED) --out $(GDATA) --max-classes 100 --train-scenes 2000 --val-scenes 300 --test-scenes 300

$(DEMO)/glip/export/backbone.json: $(GDATA)/val/stats.json configs/glip_demo.yaml $(DEMO)/pretrain/export/backbone.json
	$(BIN)/baton pretrain configs/glip_demo.yaml resume=latest $(GLIP_RUN) run_dir=$(DEMO)/glip
	$(BIN)/baton export $(DEMO)/glip $(DEMO)/glip/export

# the baselines: a small text transformer instead of the pretrained MiniLM, left at its random init
# (untrained) or trained from scratch (scratch)
GLIP_TEXT_untrained := glip.text_encoder=open_clip glip.lock_text=true
GLIP_TEXT_scratch   := glip.text_encoder=open_clip glip.lock_text=false
$(DEMO)/glip_text_%/.done: $(GDATA)/val/stats.json configs/glip_demo.yaml $(DEMO)/pretrain/export/backbone.json
	$(BIN)/baton pretrain configs/glip_demo.yaml resume=latest $(GLIP_RUN) $(GLIP_TEXT_$*) \
	  run_dir=$(DEMO)/glip_text_$*
	touch $@
.PRECIOUS: $(DEMO)/glip_text_%/.done

$(DEMO)/glip/eval_%/metrics.json: $(DEMO)/glip/export/backbone.json
	$(BIN)/baton evaluate $(DEMO)/glip --shards $(GDATA)/$(if $(filter seen,$*),val,test) --out $(DEMO)/glip/eval_$*

$(DEMO)/glip_text_untrained/eval_%/metrics.json: $(DEMO)/glip_text_untrained/.done
	$(BIN)/baton evaluate $(DEMO)/glip_text_untrained --shards $(GDATA)/$(if $(filter seen,$*),val,test) \
	  --out $(DEMO)/glip_text_untrained/eval_$*

$(DEMO)/glip_text_scratch/eval_%/metrics.json: $(DEMO)/glip_text_scratch/.done
	$(BIN)/baton evaluate $(DEMO)/glip_text_scratch --shards $(GDATA)/$(if $(filter seen,$*),val,test) \
	  --out $(DEMO)/glip_text_scratch/eval_$*

$(DEMO)/glip/eval_random/metrics.json: $(DEMO)/glip/export/backbone.json
	$(BIN)/baton evaluate random --seed $(SEED) --like $(DEMO)/glip/export --data-source shards --data-root $(DATA) --out $(DEMO)/glip/eval_random

$(DEMO)/glip/eval_pretrained/metrics.json: $(DEMO)/glip/export/backbone.json $(DATA)/stats.json
	$(BIN)/baton evaluate $(DEMO)/glip/export --data-source shards --data-root $(DATA) --out $(DEMO)/glip/eval_pretrained

$(DEMO)/glip/finetune/model/.done: $(DEMO)/glip/export/backbone.json configs/demo_softtriple_glip.yaml configs/demo_softtriple.yaml
	$(BIN)/baton finetune configs/demo_softtriple_glip.yaml resume=latest $(RUNARGS) \
	  run_dir=$(DEMO)/glip/finetune backbone=$(DEMO)/glip/export
	touch $@

$(DEMO)/glip/eval_finetuned/metrics.json: $(DEMO)/glip/finetune/model/.done
	$(BIN)/baton evaluate $(DEMO)/glip/finetune --data-source shards --data-root $(DATA) --out $(DEMO)/glip/eval_finetuned

GLIP_EVALS := $(foreach r,glip glip_text_untrained glip_text_scratch,$(foreach s,seen unseen,$(DEMO)/$(r)/eval_$(s)/metrics.json))
$(DEMO)/glip/report.md: $(GLIP_EVALS) $(DEMO)/eval_pixels/metrics.json $(DEMO)/glip/eval_random/metrics.json \
                        $(DEMO)/eval_pretrained/metrics.json $(DEMO)/glip/eval_pretrained/metrics.json \
                        $(DEMO)/glip/eval_finetuned/metrics.json
	$(BIN)/baton report --out $@ --title "baton demo, GLIP: grounding on held-out scenes, retrieval on held-out classes" \
	  --row "raw pixels 16x16=$(DEMO)/eval_pixels" \
	  --row "random init=$(DEMO)/glip/eval_random" \
	  --row "CLIP pretrained (GLIP's image init)=$(DEMO)/eval_pretrained" \
	  --row "GLIP backbone=$(DEMO)/glip/eval_pretrained" \
	  --row "GLIP backbone + SoftTriple finetuned=$(DEMO)/glip/eval_finetuned" \
	  --row "seen classes: text encoder untrained=$(DEMO)/glip_text_untrained/eval_seen" \
	  --row "seen classes: text encoder from scratch=$(DEMO)/glip_text_scratch/eval_seen" \
	  --row "seen classes: GLIP (MiniLM text)=$(DEMO)/glip/eval_seen" \
	  --row "unseen classes: text encoder untrained=$(DEMO)/glip_text_untrained/eval_unseen" \
	  --row "unseen classes: text encoder from scratch=$(DEMO)/glip_text_scratch/eval_unseen" \
	  --row "unseen classes (zero-shot): GLIP (MiniLM text)=$(DEMO)/glip/eval_unseen" \
	  --loss-curve "GLIP pretrain=$(DEMO)/glip/metrics.jsonl" \
	  --loss-curve "text encoder untrained=$(DEMO)/glip_text_untrained/metrics.jsonl" \
	  --loss-curve "text encoder from scratch=$(DEMO)/glip_text_scratch/metrics.jsonl" \
	  --loss-curve "GLIP backbone + SoftTriple=$(DEMO)/glip/finetune/metrics.jsonl" \
	  --expect-increasing "raw pixels 16x16,GLIP backbone + SoftTriple finetuned" \
	  --expect-increasing "seen classes: text encoder untrained,seen classes: GLIP (MiniLM text)" \
	  --expect-increasing "unseen classes: text encoder untrained,unseen classes (zero-shot): GLIP (MiniLM text)"

demo-glip: setup $(DEMO)/glip/report.md
	@cat $(DEMO)/glip/report.md

$(DEMO)/report.md: $(DEMO)/eval_pixels/metrics.json $(DEMO)/eval_random/metrics.json \
                   $(DEMO)/eval_pretrained/metrics.json $(DEMO)/eval_finetuned/metrics.json \
                   $(DEMO)/eval_scratch/metrics.json
	$(BIN)/baton report --out $@ \
	  --row "raw pixels 16x16=$(DEMO)/eval_pixels" \
	  --row "random init=$(DEMO)/eval_random" \
	  --row "CLIP pretrained=$(DEMO)/eval_pretrained" \
	  --row "SoftTriple from scratch=$(DEMO)/eval_scratch" \
	  --row "CLIP pretrained + SoftTriple=$(DEMO)/eval_finetuned" \
	  --loss-curve pretrain=$(DEMO)/pretrain/metrics.jsonl \
	  --loss-curve finetune=$(DEMO)/finetune/metrics.jsonl \
	  --loss-curve "finetune from scratch=$(DEMO)/finetune_scratch/metrics.jsonl" \
	  --grid $(DEMO)/eval_finetuned/retrieval_grid.png \
	  --expect-increasing "raw pixels 16x16,CLIP pretrained + SoftTriple" \
	  --expect-not-decreasing "SoftTriple from scratch,CLIP pretrained + SoftTriple"

demo: setup
	@$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=line $(DEMO)/report.md
	@cat $(DEMO)/report.md
	@echo "report: $(DEMO)/report.md"

# `make demo-lg`: language guidance on the demo's CLIP backbone, SoftTriple + ELG and + PLG beside
# SoftTriple alone (the same recipe and steps) -> $(DEMO)/lg/report.md. Outside `make demo` (its
# 15-minute budget: two more finetunings); on the emoji ELG and PLG gain 2-3.6 points of Recall@1 on
# every seed (BENCHMARKS.md, "Batch 16").
$(DEMO)/lg/report.md: $(DEMO)/eval_finetuned/metrics.json $(DEMO)/eval_elg/metrics.json $(DEMO)/eval_plg/metrics.json
	$(BIN)/baton report --out $@ --title "baton demo, language guidance: retrieval on held-out classes" \
	  --row "CLIP pretrained + SoftTriple=$(DEMO)/eval_finetuned" \
	  --row "SoftTriple + ELG=$(DEMO)/eval_elg" \
	  --row "SoftTriple + PLG=$(DEMO)/eval_plg" \
	  --loss-curve finetune=$(DEMO)/finetune/metrics.jsonl \
	  --loss-curve "finetune + ELG=$(DEMO)/finetune_elg/metrics.jsonl" \
	  --loss-curve "finetune + PLG=$(DEMO)/finetune_plg/metrics.jsonl"

demo-lg: setup
	@$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=line $(DEMO)/lg/report.md
	@cat $(DEMO)/lg/report.md

# Multi-seed results: the demo and demo-lg once per seed (runs/demo, runs/demo-seed1, ...), then mean ± std
# of every report row over the seeds -> runs/results/results.md and results.json (lg: runs/results/lg/).
SEEDS ?= 0 1 2
seed_dir = $(if $(filter 0,$(1)),runs/demo,runs/demo-seed$(1))

results: setup
	@for s in $(SEEDS); do $(MAKE) --no-print-directory demo demo-lg SEED=$$s || exit 1; done
	$(BIN)/baton report --out runs/results/results.md --seeds $(foreach s,$(SEEDS),$(call seed_dir,$(s)))
	$(BIN)/baton report --out runs/results/lg/results.md --seeds $(foreach s,$(SEEDS),$(call seed_dir,$(s))/lg)
	@cat runs/results/results.md runs/results/lg/results.md

clean-demo:
	rm -rf runs/demo runs/demo-seed* runs/results data/emoji data/emoji-seed* data/grounding-emoji* 

clean: clean-demo
	rm -rf $(VENV) .stamp-system-deps
