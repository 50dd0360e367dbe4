// llama.cpp's own answer for a GGUF file, for Fathom's format fixtures: feeds token ids, prints
// JSON {"logits": last prompt position's logits, "greedy": STEPS greedy token ids}.
// Build (against the llama.cpp tree tools/gguf/get_llama_cpp.sh built):
//   g++ -O2 -std=c++17 tools/gguf/llama_logits.cpp -I$LLAMA/include -I$LLAMA/ggml/include \
//       -L$LLAMA/build/bin -lllama -lggml -lggml-base -Wl,-rpath,$LLAMA/build/bin -o llama_logits
// Run: ./llama_logits MODEL.gguf 1,2,3 STEPS
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s MODEL ids STEPS\n", argv[0]); return 2; }
    llama_backend_init();
    llama_log_set([](enum ggml_log_level, const char *, void *) {}, nullptr);
    auto mp = llama_model_default_params();
    llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    auto cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    // f32 KV cache: Fathom's cache is f32, so the comparison measures the weights' formats only.
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    llama_context *ctx = llama_init_from_model(model, cp);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::vector<llama_token> ids;
    std::stringstream ss(argv[2]);
    for (std::string t; std::getline(ss, t, ',');) ids.push_back(std::stoi(t));
    int steps = atoi(argv[3]);
    if (llama_decode(ctx, llama_batch_get_one(ids.data(), ids.size()))) return 1;
    const float *l = llama_get_logits_ith(ctx, -1);
    printf("{\"logits\": [");
    for (int i = 0; i < n_vocab; i++) printf(i ? ",%.7g" : "%.7g", l[i]);
    printf("], \"greedy\": [");
    for (int s = 0; s < steps; s++) {
        const float *lg = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (int i = 1; i < n_vocab; i++) if (lg[i] > lg[best]) best = i;
        printf(s ? ",%d" : "%d", best);
        if (llama_decode(ctx, llama_batch_get_one(&best, 1))) return 1;
    }
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
