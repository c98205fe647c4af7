// cumo_make_shapes: writes the built-in "shapes" world (PNG images + LLaVA JSON for the three training stages and
// a held-out eval split). Deterministic: the same arguments give byte-identical files.
//
//   cumo_make_shapes --out data/shapes [--seed 0] [--train 1000] [--eval 100] [--size 32]
//                    [--min-objects 1] [--max-objects 3] [--colours 6] [--questions-per-image 5]
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>

#include "cli.hpp"
#include "cumo/data/shapes_world.hpp"

namespace {
void usage(std::ostream& os) {
  os << "usage: cumo_make_shapes --out DIR [--seed S] [--train N] [--eval M] [--size PX]\n"
        "                        [--min-objects A] [--max-objects B] [--colours C] [--questions-per-image Q]\n"
        "                        [--supersample K]\n"
        "Writes DIR/images/{train,eval}_NNNNNN.png and DIR/{stage1,stage2,stage3,eval}.json (LLaVA format),\n"
        "plus DIR/shapes_world.json with the settings. Defaults: seed 0, 1000 train and 100 eval images of 32x32,\n"
        "1-3 objects, 6 colours, 5 stage-3 questions per training image (one of each type).\n";
}
}  // namespace

int main(int argc, char** argv) {
  cumo::data::ShapesConfig c;
  std::string out;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "-h" || a == "--help") {
      usage(std::cout);
      return 0;
    }
    if (i + 1 >= argc) {
      std::cerr << "cumo_make_shapes: " << a << " needs a value (or unknown flag)\n";
      usage(std::cerr);
      return 2;
    }
    const char* v = argv[++i];
    if (a == "--out") out = v;
    else if (a == "--seed") c.seed = std::uint64_t(cumo::cli::to_int("cumo_make_shapes", a, v, 0));
    else if (a == "--train") c.train_images = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else if (a == "--eval") c.eval_images = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else if (a == "--size") c.image_size = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else if (a == "--min-objects") c.min_objects = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else if (a == "--max-objects") c.max_objects = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else if (a == "--colours" || a == "--colors") c.colours = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else if (a == "--questions-per-image") c.questions_per_image = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else if (a == "--supersample") c.supersample = int(cumo::cli::to_int("cumo_make_shapes", a, v, 0, INT_MAX));
    else {
      std::cerr << "cumo_make_shapes: unknown flag " << a << "\n";
      usage(std::cerr);
      return 2;
    }
  }
  if (out.empty()) {
    std::cerr << "cumo_make_shapes: --out DIR is required\n";
    usage(std::cerr);
    return 2;
  }
  try {
    const auto s = cumo::data::write_shapes_world(out, c);
    std::cout << "shapes world (seed " << c.seed << ", " << c.image_size << "x" << c.image_size << ") in " << out
              << ": " << s.train_images << " train + " << s.eval_images << " eval images; stage1.json "
              << s.stage1 << ", stage2.json " << s.stage2 << ", stage3.json " << s.stage3 << ", eval.json " << s.eval
              << " records\n";
  } catch (const std::exception& e) {
    std::cerr << "cumo_make_shapes: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
