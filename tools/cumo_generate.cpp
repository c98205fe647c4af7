// cumo_generate: answers a question about an image with a CuMo checkpoint, streaming the answer as it is generated.
//
//   cumo_generate --checkpoint DIR --image FILE --prompt "..." [--max-new-tokens N] [--temperature T] [--top-p P]
//                 [--seed S] [--template NAME] [--tokenizer SPEC] [--clip-config FILE] [--device cpu|cuda] [--dtype f32|bf16|f16]
//   cumo_generate --checkpoint DIR --batch FILE.jsonl [same options]     one {"image", "prompt"} object per line;
//                 writes one {"image", "prompt", "answer", "tokens", "seconds"} line per record to stdout
//
// DIR is either a released CuMo checkpoint (config.json with model_type llava_mistral / llava_mixtral, weights in the
// release layout, tokenizer.model beside them; models/cumo_release.hpp) or a checkpoint written by cumo_train. The
// prompt is rendered with the checkpoint's chat template (release: mistral_instruct_system, CuMo's eval template;
// a cumo_export of a cumo_train run names its run's template and tokenizer in config.json),
// the image preprocessed as the model was trained (release: pad to square with the CLIP mean colour when
// image_aspect_ratio is "pad", CLIP resize and crop). Temperature 0 (the default) is greedy. Tokens/s goes to stderr.
#include <climits>
#include <iostream>
#include <string_view>

#include "generate_run.hpp"

namespace {
using namespace cumo_generate_app;

void usage(std::ostream& os) {
  os << "usage: cumo_generate --checkpoint DIR (--image FILE --prompt TEXT | --batch FILE.jsonl)\n"
        "                     [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--template NAME]\n"
        "                     [--tokenizer SPEC] [--clip-config FILE] [--device cpu|cuda] [--dtype f32|bf16|f16] [--quiet]\n"
        "  --checkpoint   a released CuMo directory (config.json + release-layout weights) or a cumo_train checkpoint\n"
        "  --temperature  0 (default): greedy; > 0: sampling, with --top-p (default 1) and --seed (default 0)\n"
        "  --tokenizer    default: DIR/tokenizer.model for a release (else the tokenizer its config.json names), the\n"
        "                 run's tokenizer for a cumo_train checkpoint\n"
        "  --template     chat template (default: mistral_instruct_system for a release, or the template its\n"
        "                 config.json names; the run's eval template for a cumo_train checkpoint)\n"
        "  --clip-config  the CLIP config.json of a release (default: beside it, else inferred from the tensors)\n"
        "  --dtype        the matrix weights in memory (default f32); bf16/f16 halve it, products accumulate in fp32\n"
        "  --device       cpu (default) or cuda: the model on the GPU (a CUDA build; unverified: never run on a GPU)\n"
        "  --batch        JSON lines of {\"image\": FILE, \"prompt\": TEXT}; answers go to stdout as JSON lines\n";
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  auto on_switch = [&](std::string_view f) {
    if (f == "--quiet" || f == "-q") return a.quiet = true;
    return false;
  };
  auto on_value = [&](std::string_view f, const char* v) {
    if (f == "--checkpoint") a.checkpoint = v;
    else if (f == "--image") a.image = v;
    else if (f == "--prompt") a.prompt = v;
    else if (f == "--batch") a.batch = v;
    else if (f == "--template") a.chat = v;
    else if (f == "--tokenizer") a.tokenizer = v;
    else if (f == "--clip-config") a.clip_config = v;
    else if (f == "--device") a.device = v;
    else if (f == "--dtype") a.dtype = v;
    else if (f == "--max-new-tokens") a.max_new = cli::to_int(kTool, f, v, 1, INT_MAX);
    else if (f == "--seed") a.seed = cli::to_int(kTool, f, v, 0);
    else if (f == "--temperature") a.temperature = float(cli::to_double(kTool, f, v));
    else if (f == "--top-p") a.top_p = float(cli::to_double(kTool, f, v));
    else return false;
    return true;
  };
  if (const auto status = cli::parse_args(kTool, argc, argv, usage, on_switch, on_value)) return *status;
  if (a.checkpoint.empty() || (a.batch.empty() && (a.image.empty() || a.prompt.empty()))) {
    std::cerr << kTool << ": --checkpoint and either --image + --prompt or --batch are required\n";
    usage(std::cerr);
    return 2;
  }
  try {
    CUMO_CHECK(a.device == "cpu" || a.device == "cuda", "--device must be cpu or cuda, got '", a.device, "'");
    if (a.device == "cuda") {
#if defined(CUMO_GENERATE_CUDA)
      return run_on_gpu(a);
#else
      fail("--device cuda, but this build has no CUDA backend (configure with -DCUMO_CUDA=ON on a machine with the "
           "CUDA toolkit)");
#endif
    }
    return run(a, backend::Cpu{});
  } catch (const std::bad_alloc&) {
    std::cerr << kTool << ": out of memory (std::bad_alloc): the model does not fit in this machine's memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << kTool << ": " << e.what() << "\n";
    return 1;
  }
}
